"""The plain install is the client role: a fresh virtual environment with the project and its locked base
dependencies only (conftest's plain_python) has no torch, transformers or vLLM, and its commands say which extra
they miss. That it routes through a running deployment as the full install does is tested beside the batch
integration tests, on their server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lora_router.cli import COMMANDS


def test_the_plain_install_has_no_torch_transformers_or_vllm(plain_python):
    for module in ("torch", "transformers", "vllm", "numpy", "peft"):
        done = subprocess.run([plain_python, "-c", f"import {module}"], capture_output=True, text=True)
        assert done.returncode != 0 and "ModuleNotFoundError" in done.stderr, module
    done = subprocess.run([plain_python, "-c", "import router_client, lora_router, serving.admin"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("command, extra", [("serve", "cpu"), ("train", "train")])
def test_a_command_without_its_extra_names_the_extra_in_one_line(plain_python, command, extra, tmp_path):
    script = plain_python.with_name("lora-router")
    done = subprocess.run([script, command, "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and f"lora-router[{extra}]" in done.stderr, done.stderr


def test_the_client_commands_run_from_the_wheel_with_its_packaged_defaults(plain_python, tmp_path):
    script = plain_python.with_name("lora-router")
    for command in ("route", "batch", "admin"):
        done = subprocess.run([script, command, "--help"], capture_output=True, text=True, cwd=tmp_path)
        assert done.returncode == 0 and "--config" in done.stdout, done.stderr
    # No configs/ here: the default deployment is the wheel's copy, read with this folder as the project root.
    done = subprocess.run([plain_python, "-c", "from lora_router.deployment import DeploymentArguments as D; "
                           "d = D().deployment(); print(d.root, d.router.path)"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(tmp_path), "checkpoints/tiny/router"]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_each_console_command_is_its_python_m_form(command):
    """Same help text, flags and exit status as `python -m MODULE` (the full install has every extra)."""
    script = Path(sys.executable).with_name("lora-router")
    console = subprocess.run([script, command, "--help"], capture_output=True, text=True, timeout=120)
    module = subprocess.run([sys.executable, "-m", COMMANDS[command][0], "--help"], capture_output=True, text=True,
                            timeout=120)
    assert console.returncode == module.returncode == 0, console.stderr
    assert console.stdout == module.stdout and "usage:" in console.stdout


def test_lora_router_lists_its_commands_and_refuses_an_unknown_one():
    script = Path(sys.executable).with_name("lora-router")
    listed = subprocess.run([script], capture_output=True, text=True)
    assert listed.returncode == 2 and all(f"  {name} " in listed.stdout for name in COMMANDS)
    unknown = subprocess.run([script, "sevre"], capture_output=True, text=True)
    assert unknown.returncode == 2 and "unknown command 'sevre'" in unknown.stderr
