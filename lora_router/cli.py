"""`lora-router COMMAND [FLAGS]`: the commands a user types most, each exactly its `python -m` form.

    lora-router serve      python -m serving                 (extra: cpu or gpu)
    lora-router route      python -m router_client           (plain install)
    lora-router batch      python -m router_client.batch     (plain install)
    lora-router admin      python -m serving.admin           (plain install)
    lora-router balance    python -m serving.balancer        (extra: fleet)
    lora-router train      python -m training.train_qwen     (extra: train)
    lora-router bench      python -m benchmarks.load         (extras: cpu or gpu, and train)
    lora-router quickstart python -m benchmarks.quickstart   (extras: cpu or gpu, and train)

The module runs as `__main__` with the remaining arguments, so its flags, help and exit statuses are its own. The
commands are named, not imported, here: the core stays under every package, and a command whose extra is not
installed ends with one line naming the extra instead of an ImportError.
"""

from __future__ import annotations

import runpy
import sys
from collections.abc import Sequence

# command -> (module run as __main__, what it does)
COMMANDS = {
    "serve": ("serving", "serve a deployment: vLLM with every adapter, and the routing gateway"),
    "route": ("router_client", "route one screenshot and run the chosen expert"),
    "batch": ("router_client.batch", "route a folder of screenshots or an OpenAI Batch file"),
    "admin": ("serving.admin", "add or remove experts, shadow and promote routers on a running deployment"),
    "balance": ("serving.balancer", "run the balancer (Caddy) in front of a fleet of replicas"),
    "train": ("training.train_qwen", "train a router or expert LoRA with the project's trainer"),
    "bench": ("benchmarks.load", "load-test a deployment (latency, throughput, baselines)"),
    "quickstart": ("benchmarks.quickstart", "the main job: train, serve and route end to end on the tiny default"),
}
# A missing package -> the extra that installs it.
EXTRAS = {
    "vllm": "cpu (or gpu)", "prometheus_client": "cpu (or gpu)", "openai": "cpu (or gpu)",
    "torch": "train", "torchvision": "train", "transformers": "train", "tokenizers": "train", "peft": "train",
    "accelerate": "train", "numpy": "train", "matplotlib": "train", "tensorboard": "train", "rapidfuzz": "train",
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {what} (python -m {module})" for name, (module, what) in COMMANDS.items()]
    return "usage: lora-router COMMAND [FLAGS]   (lora-router COMMAND --help for its flags)\n\ncommands:\n" + \
        "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        sys.stderr.write(f"error: unknown command {name!r}\n{usage()}")
        return 2
    module = COMMANDS[name][0]
    sys.argv = [f"lora-router {name}", *rest]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").partition(".")[0]
        if missing not in EXTRAS:
            raise
        sys.stderr.write(f"error: lora-router {name} needs {missing}, which the {EXTRAS[missing]} extra installs: "
                         f"pip install 'lora-router[{EXTRAS[missing].split()[0]}]'\n")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
