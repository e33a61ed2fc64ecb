"""The trainer: evaluation-time mechanism options, device and dtype, validation metric."""

import pytest
import torch

from attnlab.arena.config import parse_sweep
from attnlab.arena.trainer import (
    TRAIN_CURVES,
    OnDevice,
    evaluation_model,
    learning_rate,
    train_run,
)
from attnlab.tasks import make_task

TINY = {"task": "markov", "task_params": {"states": 3, "length": 24}, "seeds": 1,
        "model": {"dim": 16, "depth": 1, "heads": 2},
        "train": {"steps": 6, "batch_size": 4, "curve_points": 3}}


def spec_of(mechanism, **extra):
    train = {**TINY["train"], **extra.pop("train", {})}
    return parse_sweep({**TINY, "mechanisms": [mechanism], "train": train, **extra}).runs()[0]


def test_eval_kwargs_rebuild_the_trained_model_with_other_mechanism_arguments():
    lssa = {"mechanism": "softplus", "label": "lssa", "kwargs": {"reweight_p": 0}}
    as_lssar = {**lssa, "label": "lssa-as-lssar", "eval_kwargs": {"reweight_p": 15}}
    spec = spec_of(as_lssar)
    task = make_task(spec.task, **spec.task_params)
    torch.manual_seed(0)
    trained = task.build_model("softplus", spec.kwargs, **spec.model)
    assert trained.blocks[0].attn.reweight_p is None  # LSSA while training
    rebuilt = evaluation_model(task, spec, trained)
    assert rebuilt.blocks[0].attn.reweight_p == 15  # LSSAR at evaluation
    for (name, a), b in zip(trained.state_dict().items(), rebuilt.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name  # the trained weights, every one
    # the same training, evaluated two ways: the numbers differ, the training curves do
    # not (the validation curve follows the evaluation-time arguments)
    plain, other = train_run(spec_of(lssa)), train_run(spec)
    for name in ("step", *TRAIN_CURVES):
        assert plain["curves"][name] == other["curves"][name], name
    assert plain["metrics"]["loss"] != other["metrics"]["loss"]
    assert plain["curves"]["val_loss"] != other["curves"]["val_loss"]
    assert other["curves"]["val_loss"][-1] == other["metrics"]["val_loss"]


def test_bfloat16_autocast_trains_and_is_recorded_in_the_key():
    fp32, bf16 = spec_of("softmax"), spec_of("softmax", train={"dtype": "bfloat16"})
    assert bf16.train["dtype"] == "bfloat16" and bf16.key != fp32.key
    a, b = train_run(fp32), train_run(bf16)
    assert a["status"] == b["status"] == "done", b["error"]
    assert a["metrics"]["loss"] != b["metrics"]["loss"]  # autocast really ran
    assert abs(a["metrics"]["loss"] - b["metrics"]["loss"]) < 0.1


def test_on_device_wrapper_returns_cpu_float_and_exposes_the_model():
    model = make_task("copy").build_model("softmax", {}, dim=16, depth=1, heads=2)
    wrapped = OnDevice(model, torch.device("cpu"), "bfloat16")
    out = wrapped(torch.zeros(1, 5, dtype=torch.long))
    assert out.dtype == torch.float32 and out.device.type == "cpu"
    assert wrapped.blocks is model.blocks  # attributes fall through


def test_learning_rate_warms_up_then_decays_to_zero():
    lrs = [learning_rate(s, 100, 1.0, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(x >= y for x, y in zip(lrs[9:], lrs[10:], strict=False))
    assert lrs[-1] < 0.001


@pytest.mark.slow
def test_compiled_training_gives_the_same_numbers():
    plain, compiled = spec_of("softmax"), spec_of("softmax", train={"compile": True})
    assert compiled.key != plain.key
    a, b = train_run(plain), train_run(compiled)
    assert b["status"] == "done", b["error"]
    assert b["metrics"]["loss"] == pytest.approx(a["metrics"]["loss"], rel=1e-3)


class _RecordsCopies(torch.Tensor):
    """A tensor that records the ``non_blocking`` flag of every ``.to`` call on it."""

    flags: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to:
            cls.flags.append(kwargs.get("non_blocking", False))
        return super().__torch_function__(func, types, args, kwargs)


def test_copies_to_the_cpu_wait_for_their_data():
    """A non-blocking device-to-host copy can be read before it lands (CUDA evaluations
    were wrong and changed from call to call): copies to the CPU must block."""
    from attnlab.arena.trainer import to_device

    _RecordsCopies.flags.clear()
    batch = (torch.ones(3).as_subclass(_RecordsCopies), {"x": torch.ones(2).as_subclass(
        _RecordsCopies)})
    to_device(batch, torch.device("cpu"))
    assert _RecordsCopies.flags == [False, False]


def test_evaluation_wrapper_returns_the_models_output_on_the_test_device():
    """OnDevice on the device of the op tests (``pytest --device cuda``): what comes back to
    the CPU equals the model's own output, for an output large enough that an unfinished
    copy would show."""
    from tests.device import DEVICE

    model = torch.nn.Linear(64, 4096).to(DEVICE)
    x = torch.randn(64, 64)
    with torch.no_grad():
        want = model(x.to(DEVICE)).cpu()
        for _ in range(3):
            got = OnDevice(model, DEVICE, "float32")(x)
            assert got.device.type == "cpu"
            torch.testing.assert_close(got, want, rtol=0, atol=0)
