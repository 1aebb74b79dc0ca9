"""lm-evaluation-harness entry point: `python -m memmix.evaluation.lm_eval --model hf --model_args pretrained=PATH ...`

lm_eval's `hf` model loads through `AutoModelForCausalLM`, which only knows memmix models after memmix has
registered them; this wrapper imports memmix first and then hands every argument to lm_eval's own CLI.
"""
from __future__ import annotations

import sys


def _lm_eval_cli():
    """lm_eval's command-line function, across lm_eval versions; None if lm_eval is not installed."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return None
    try:
        from lm_eval.__main__ import cli_evaluate

        return cli_evaluate
    except ImportError:
        from lm_eval._cli import cli_evaluate  # newer layouts

        return cli_evaluate


def main(argv: list[str] | None = None) -> int:
    import memmix.models  # noqa: F401  (registers MoM with AutoConfig / AutoModelForCausalLM)

    cli = _lm_eval_cli()
    if cli is None:
        print("memmix lm_eval: lm-evaluation-harness is not installed: pip install lm_eval", file=sys.stderr)
        return 2
    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    result = cli()
    return int(result or 0) if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
