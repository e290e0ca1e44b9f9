"""The README's code and the CI line, executed: the library example, the recipes with cglora's
layers and with peft, and the install and test commands CI runs; and the reading budgets."""
import ast
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_readme_example_runs(tmp_path, monkeypatch):
    readme = Path(__file__).resolve().parents[1].joinpath("README.md").read_text()
    code = readme.split("```python\n")[1].split("```")[0]
    assert "cglora.add_lora" in code and "init_adapters" in code
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(code, scope)
    assert scope["report"][0]["captured"] > 0
    assert scope["model"].body.lora_B.abs().max() > 0
    saved = torch.load(tmp_path / "adapter" / "adapter_model.bin")  # the head it trains is saved too
    for name, value in scope["model"].head.state_dict().items():
        assert torch.equal(saved[f"base_model.model.head.{name}"], value)


def _readme_block(marker):
    """The README's ```python block that contains `marker`."""
    readme = Path(__file__).resolve().parents[1].joinpath("README.md").read_text()
    block, = [b.split("```")[0] for b in readme.split("```python\n")[1:] if marker in b.split("```")[0]]
    return block


def test_readme_recipe_with_cglora_layers_runs():
    pytest.importorskip("transformers")
    scope = {}
    exec(_readme_block("from transformers import BertConfig"), scope)
    model, layers = scope["model"], scope["layers"]
    assert sorted(layers) == [f"bert.encoder.layer.{i}.attention.self.{n}" for i in (0, 1) for n in ("query", "value")]
    assert all(layer.lora_B.abs().max() > 0 for layer in layers.values())
    head = {f"{m}.{p}" for m in ("classifier", "bert.pooler.dense") for p in ("weight", "bias")}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {f"{n}.lora_{f}" for n in layers for f in "AB"} | head


def test_readme_recipe_with_peft_gives_the_same_update():
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    scope = {}
    exec(_readme_block("from transformers import BertConfig"), scope)
    exec(_readme_block("get_peft_model("), scope)  # the README's second block continues the first
    lora = {n: m for n, m in scope["peft_model"].named_modules() if hasattr(m, "get_delta_weight")}
    assert len(lora) == len(scope["report"]) == 4
    trained = {name: sum(p.numel() for p in scope[name].parameters() if p.requires_grad) for name in ("model", "peft_model")}
    assert trained == {"model": 2146, "peft_model": 2146}  # the same set: adapters, classifier, pooler
    for name, m in lora.items():  # same weights, same batches: peft's s B A is cglora's
        ours = scope["layers"][name.removeprefix("base_model.model.")].delta_weight()
        assert ours.abs().max() > 0
        torch.testing.assert_close(m.get_delta_weight("default"), ours, atol=1e-6, rtol=1e-4)


def test_ci_installs_what_the_readme_says_and_runs_its_test_command():
    here = Path(__file__).resolve().parents[1]  # the repository root
    block = (here / "README.md").read_text().split("```bash\n")[1].split("```")[0]
    install, test = block.splitlines()[1].split(" && ")  # the second line: the test install and command
    ci = [line.split("#")[0].strip() for line in (here / ".ci" / "run").read_text().splitlines()]
    assert install.replace("pip install", "pip install -q") in ci and test in ci
    assert ci.index(install.replace("pip install", "pip install -q")) < ci.index(test)


def _function_lengths(path):
    """{name: non-blank lines} of every function and method in a file, each counted from its first
    decorator (or its def line) to the last line of its body."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    return {node.name: sum(1 for line in lines[min([d.lineno for d in node.decorator_list]
                                                   + [node.lineno]) - 1:node.end_lineno]
                           if line.strip())
            for node in ast.walk(ast.parse(text))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


def test_function_lengths_count_decorators_and_bodies_but_not_blank_lines(tmp_path):
    source = "import x\n\n\n@a\n@b(1)\ndef f(y):\n    z = 1\n\n    return z\n\n\nclass C:\n" \
             "    def g(self):\n        pass\n\n\nW = 2\n"
    (tmp_path / "m.py").write_text(source)
    assert _function_lengths(tmp_path / "m.py") == {"f": 5, "g": 2}


def test_reading_budgets():
    # the design card's budgets: a reader audits the algorithm in one sitting
    over = []  # every budget missed, in one failure
    readme = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    if len(readme) > 300:
        over.append(f"README.md: {len(readme)} lines > 300")
    docs = (ROOT / "docs" / "cg-lora.md").read_text(encoding="utf-8").splitlines()
    if len(docs) > 500:
        over.append(f"docs/cg-lora.md: {len(docs)} lines > 500")
    for name in ("cglora.py", "models.py", "data.py", "train.py"):
        lines = (ROOT / name).read_text(encoding="utf-8").splitlines()
        if (widest := max(len(line.encode()) for line in lines)) > 100:
            over.append(f"{name}: a line of {widest} columns > 100")
    code = (ROOT / "cglora.py").read_text(encoding="utf-8")
    part = code[code.index("# Part I: the algorithm"):code.index("# Part II")]
    plumbing = part[part.index("# ---------- the plumbing".replace("-" * 10, "-" * 65)):
                    part.index("# ---------- §2 statistics".replace("-" * 10, "-" * 77))]
    algorithm = part.replace(plumbing, "")  # the design card's budget: the algorithm alone
    if (total := sum(1 for line in algorithm.splitlines() if line.strip())) > 450:
        over.append(f"cglora.py: the algorithm (part I less its plumbing) {total} non-blank "
                    "lines > 450")
    long = {name: n for name, n in _function_lengths(ROOT / "cglora.py").items() if n > 50}
    if long:
        over.append(f"cglora.py: functions over 50 non-blank lines: {long}")
    assert not over, "; ".join(over)


def _private_uses(text):
    """The cglora._private names a text uses: cglora._name, or imported by from cglora import."""
    imported = (name for block in re.findall(r"from\s+cglora\s+import\s+(\([^)]*\)|[^\n]*)", text)
                for name in re.findall(r"\w+", re.sub(r"#.*", "", block)))
    private = re.findall(r"\bcglora\.(_(?!_)\w+)", text)  # not a dunder such as __all__
    return set(private) | {n for n in imported if n.startswith("_") and not n.startswith("__")}


def test_the_public_api_is_listed_and_no_other_module_uses_a_private_name():
    import cglora
    assert len(cglora.__all__) == len(set(cglora.__all__)) and all(hasattr(cglora, n) for n in cglora.__all__)
    example = "cglora._eig(X)\nfrom cglora import (add_lora,  # a comment\n    _fp32)\n"
    assert _private_uses(example) == {"_eig", "_fp32"}
    assert _private_uses("cglora.__all__ lists the public API") == set()
    ours = {ROOT / "cglora.py", ROOT / "test_cglora.py"}  # the library and its tests
    for path in sorted(ROOT.rglob("*")):
        relative = path.relative_to(ROOT).parts
        if (path.is_file() and (path.suffix in (".py", ".md", ".sh") or relative[0] == ".ci")
                and path not in ours and relative[0] != "tests"
                and not any(p.startswith((".git", ".venv", "__")) for p in relative)):
            assert not _private_uses(path.read_text(encoding="utf-8")), path.name
