"""The layers as DESIGN.md draws them: imports flow one way, the manifest is read once per run, the loop is short."""

import ast
import json
import shutil
import subprocess
import sys

import pytest
from helpers import CPU_CONFIG, REPO, tiny_overrides

from megagpt.config import ConfigError, load_config

PACKAGES = ("megagpt", "data_prep", "kernels", "benchmarks")


def _module_name(path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path) -> set[str]:
    """Every module a file imports, at the top or inside a function (lazy imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.split(".")[0] in PACKAGES}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")]
    modules = {_module_name(p): p for p in files}
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def test_only_the_cli_of_megagpt_imports_data_prep(graph):
    offenders = {m for m, deps in graph.items() if m.startswith("megagpt") and m != "megagpt.cli"
                 and any(d.startswith("data_prep") for d in deps)}
    assert not offenders


def test_data_prep_never_imports_the_trainer_or_the_loader(graph):
    forbidden = ("megagpt.train", "megagpt.data", "megagpt.stages", "megagpt.cli")
    offenders = {m: deps for m, deps in graph.items() if m.startswith("data_prep")
                 and any(d == f or d.startswith(f + ".") for d in deps for f in forbidden)}
    assert not offenders


def test_kernels_know_nothing_of_gpt_or_data(graph):
    assert not {m for m, deps in graph.items() if m.startswith("kernels")
                and any(d.startswith(("megagpt", "data_prep")) for d in deps)}


def test_no_import_cycle_between_modules(graph):
    done, stack = set(), []

    def visit(module):
        if module in stack:
            raise AssertionError(f"import cycle: {' -> '.join(stack[stack.index(module):] + [module])}")
        if module in done:
            return
        stack.append(module)
        for dep in graph[module]:
            visit(dep)
        stack.pop()
        done.add(module)

    for module in graph:
        visit(module)


def test_no_function_of_the_trainer_is_longer_than_60_lines():
    tree = ast.parse((REPO / "megagpt" / "train.py").read_text())
    lengths = {node.name: node.end_lineno - node.lineno + 1 for node in ast.walk(tree)
               if isinstance(node, ast.FunctionDef)}
    assert max(lengths.values()) <= 60, lengths


def test_format_version_and_sha256_are_defined_once():
    sources = [p.read_text() for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")]
    assert sum(s.count("\nFORMAT_VERSION =") for s in sources) == 1
    hashers = [line for s in sources for line in s.splitlines() if line.lstrip().startswith("def ")
               and "sha256" in line.split("(")[0]]
    assert len(hashers) == 1, hashers  # megagpt.dataset.sha256_file


def test_a_training_run_reads_the_manifest_once(shakespeare_dataset, tmp_path):
    from megagpt.train import train

    manifest = str(shakespeare_dataset / "manifest.json")
    opened = []
    recording = [True]

    def hook(event, args):
        if recording[0] and event == "open" and str(args[0]) == manifest:
            opened.append(args[1])

    sys.addaudithook(hook)  # audit hooks cannot be removed: this one stops recording after the test
    try:
        train(load_config(CPU_CONFIG, tiny_overrides(shakespeare_dataset, max_steps=4, eval_interval=2,
                                                     checkpoint_interval=2)), tmp_path)
    finally:
        recording[0] = False
    assert len(opened) == 1, opened


def test_both_batch_keys_set_is_a_one_line_error():
    with pytest.raises(ConfigError, match="grad_accum_steps .* and train.global_batch_tokens .* both set"):
        load_config(CPU_CONFIG, ["train.grad_accum_steps=2", "train.global_batch_tokens=4096"])
    result = _megagpt("train", CPU_CONFIG, "--set", "train.grad_accum_steps=2", "--set",
                      "train.global_batch_tokens=4096")
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "both set" in result.stderr


def test_a_bad_tokenizer_kind_is_a_one_line_error(shakespeare_dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(shakespeare_dataset, data)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["tokenizer"]["kind"] = "wordpiece"
    (data / "manifest.json").write_text(json.dumps(manifest))
    sets = [a for s in tiny_overrides(data, max_steps=1) for a in ("--set", s)]
    result = _megagpt("train", CPU_CONFIG, *sets, "--run-dir", tmp_path / "run")
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "tokenizer.kind" in result.stderr and "manifest.json" in result.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was written


def _megagpt(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megagpt", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=REPO)


def test_every_config_the_docs_and_launch_scripts_name_exists():
    import re

    texts = [REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "launch").iterdir()]
    named = {m for path in texts if path.is_file() for m in re.findall(r"configs/[\w.-]+\.yaml", path.read_text())}
    assert named and not {name for name in named if not (REPO / name).is_file()}  # a usage line that cannot run


def _layout_entries() -> dict[str, str]:
    """The README's tree: each unindented line's first word (a file or folder) -> its text, continuation lines
    included."""
    block = (REPO / "README.md").read_text().split("\n## Layout\n")[1].split("```")[1]
    entries: dict[str, str] = {}
    for line in block.splitlines():
        if line.strip() and not line[0].isspace():
            key = line.split()[0]
            entries[key] = line
        elif line.strip():
            entries[key] += " " + line.strip()
    return entries


def test_the_readme_tree_and_the_architecture_map_name_every_file():
    entries = _layout_entries()
    named = {folder: " ".join(text for key, text in entries.items() if key.startswith(folder + "/"))
             for folder in ("megagpt", "kernels", "data_prep", "launch", "benchmarks")}
    files = [p for folder in named for p in (REPO / folder).iterdir()
             if p.is_file() and p.name not in ("__init__.py", "__main__.py") and not p.name.endswith(".pyc")]
    unlisted = [str(p.relative_to(REPO)) for p in files if p.name not in named[p.parent.name]]
    assert not unlisted and "megagpt/stages/" in entries, unlisted  # README.md's Layout
    layers = (REPO / "docs" / "architecture.md").read_text().split("\n## Layers")[1].split("\n## ")[0]
    unplaced = [p.name for p in (REPO / "megagpt").glob("*.py")
                if p.name not in ("__init__.py", "__main__.py") and f"`megagpt/{p.name}`" not in layers]
    assert not unplaced, unplaced  # docs/architecture.md's table of layers
