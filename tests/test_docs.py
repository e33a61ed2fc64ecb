"""The code in the docs runs."""

import re
from pathlib import Path

import torch

import attnlab as al
from attnlab.core import registry

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_the_add_a_mechanism_example_registers_a_working_mechanism():
    text = (DOCS / "contract.md").read_text()
    section = text.split("## Adding a mechanism", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    before = dict(registry._REGISTRY)
    try:
        exec(compile(code, "contract.md", "exec"), {})
        attn = al.build("my_attention", dim=32, heads=4, causal=True)
        x = torch.randn(2, 9, 32)
        y = attn(x)
        state = attn.new_state(2)
        steps = torch.cat([attn(x[:, :5], state=state)] +
                          [attn(x[:, t:t + 1], state=state) for t in range(5, 9)], 1)
        torch.testing.assert_close(steps, y, atol=1e-5, rtol=1e-5)
        w = attn.weights(x)
        torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 9))
    finally:
        registry._REGISTRY.clear()
        registry._REGISTRY.update(before)


def test_the_readme_python_examples_run_and_print_what_they_say(capsys):
    readme = (DOCS.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    printed = capsys.readouterr().out.split()
    assert printed == ["True", "True", "True", "torch.Size([1,", "8,", "4096,", "64])"]


def test_every_registered_mechanism_has_a_page_naming_its_paper():
    import attnlab as al

    pages = Path(__file__).resolve().parents[1] / "docs" / "mechanisms"
    for name in al.available():
        page = pages / f"{name}.md"
        assert page.exists(), f"docs/mechanisms/{name}.md is missing"
        text = " ".join(page.read_text().split())
        title = al.info(name).paper.split(":")[0]
        assert title in text, f"{page.name} does not name its paper ({title!r})"
