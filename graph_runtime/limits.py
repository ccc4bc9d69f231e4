"""What one workflow may ask for, checked at validation, before anything loads or runs.

Without bounds a workflow can ask for work no run finishes: a 10 MB prompt takes minutes and
gigabytes in the tokenizer, a batch of 64 images of 8192 x 8192 pixels needs terabytes of
activations. Each bound is generous for real use and can be raised, in the same order as the folders
(see :mod:`.paths`): ``Runtime(limits=Limits(...))`` / CLI flags first, then the environment, then
the defaults below.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from .errors import InputError, WorkflowError

# Text encoders read little of a prompt: CLIP truncates at 77 tokens, T5 (Flux, SD3) at 512 tokens,
# a few characters each. 20,000 characters is many times what any of them reads, and tokenises in
# milliseconds.
DEFAULT_MAX_TEXT_CHARS = 20_000
# Pixels of one Sample: width x height x batch_size. 4096 x 4096 x 4 (= one 8192 x 8192 image),
# far above SDXL's and Flux's native 1024 x 1024 x a batch of 64.
DEFAULT_MAX_PIXELS = 4096 * 4096 * 4
# Nodes in one workflow: validation and the executor's overhead are linear in it (a 10,000-node
# chain validates in a fraction of a second); real workflows hold tens of nodes.
DEFAULT_MAX_NODES = 10_000


@dataclass(frozen=True)
class Limits:
    """Bounds on what one workflow may ask for. Raise one by building a new value, e.g.
    ``Runtime(limits=Limits(max_text_chars=100_000))``, the CLI's ``--max-text-chars``, or the
    environment's ``LORALOOM_MAX_TEXT_CHARS``.

    - ``max_text_chars``: characters in any one text input (a prompt, block weights, a file prefix).
    - ``max_pixels``: pixels one sampling node makes: width x height x batch_size.
    - ``max_nodes``: nodes in one workflow.
    """

    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_nodes: int = DEFAULT_MAX_NODES

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise WorkflowError(f"limit {f.name} must be a positive integer, not {value!r}",
                                    value=value, kind="bad_limit")

    @classmethod
    def configure(cls, env=None, **given: int | None) -> "Limits":
        """Arguments (``max_text_chars=...``; None means not given) first, then the environment
        (``LORALOOM_MAX_TEXT_CHARS``, ``LORALOOM_MAX_PIXELS``, ``LORALOOM_MAX_NODES``), then defaults."""
        env = os.environ if env is None else env
        unknown = set(given) - {f.name for f in fields(cls)}
        if unknown:
            raise InputError(f"Limits.configure() takes {', '.join(f.name for f in fields(cls))}; "
                             f"not {', '.join(sorted(unknown))}", value=sorted(unknown),
                             limit=[f.name for f in fields(cls)])
        values = {}
        for f in fields(cls):
            if given.get(f.name) is not None:
                values[f.name] = given[f.name]
            elif env.get(env_name(f.name)):
                text = env[env_name(f.name)]
                try:
                    values[f.name] = int(text.replace("_", ""))
                except ValueError:
                    raise WorkflowError(f"{env_name(f.name)}={text!r} is not a whole number",
                                        value=text, kind="bad_limit",
                                        fix=f"set it to a positive integer, e.g. {getattr(cls, f.name)}") from None
        return cls(**values)

    def fix(self, name: str) -> str:
        """The ``Fix:`` of an error against limit ``name``: every way to raise it."""
        return (f"ask for less, or raise the limit with {flag(name)} N, {env_name(name)}=N "
                f"or Runtime(limits=Limits({name}=N))")


def env_name(name: str) -> str:
    """The environment variable of limit ``name`` (``max_nodes`` -> ``LORALOOM_MAX_NODES``)."""
    return f"LORALOOM_{name.upper()}"


def flag(name: str) -> str:
    """The CLI flag of limit ``name`` (``max_nodes`` -> ``--max-nodes``)."""
    return "--" + name.replace("_", "-")
