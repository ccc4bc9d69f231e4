"""The ``loraloom`` command line: run, sweep, validate, nodes, convert, serve, cache.

Exit codes: 0 success; 1 validation or execution error (printed); 2 usage error (a flag or argument
that is malformed or names nothing: ``--set 5width=3``, ``--set 99.width=3`` on a workflow without
node 99, a workflow path that cannot be opened, ``--port 70000``); 130 interrupted.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import signal
import sys
import threading
from pathlib import Path

from .atomic import atomic_write_bytes
from .graph_runtime.errors import Interrupted, LoomError, ValidationError, WorkflowError
from .graph_runtime.jsonio import loads_strict

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _folder_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("folders (else LORALOOM_LORA_DIRS, LORALOOM_MODELS_DIR, "
                                      "LORALOOM_OUTPUT_DIR, else ./models/loras, ./models, ./output)")
    group.add_argument("--lora-dir", action="append", metavar="DIR", help="a folder of LoRA files (repeatable)")
    group.add_argument("--models-dir", metavar="DIR", help="the folder of base models")
    group.add_argument("--output-dir", metavar="DIR", help="where outputs are written")
    parser.add_argument("--nodes-module", action="append", metavar="MODULE",
                        help="import a Python module that registers extra nodes (repeatable; "
                             "also LORALOOM_NODE_MODULES=a,b)")


def _whole(low: int | None):
    """An argparse type: a whole number (``1_000`` allowed) of at least ``low`` (None: no bound)."""

    def parse(text: str) -> int:
        try:
            value = int(text.replace("_", ""))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if low is not None and value < low:
            raise argparse.ArgumentTypeError(f"{value} is below {low}")
        return value

    return parse


def _limit_args(parser: argparse.ArgumentParser) -> None:
    from .graph_runtime import limits

    group = parser.add_argument_group("limits on what one workflow may ask for (else LORALOOM_MAX_TEXT_CHARS, "
                                      "LORALOOM_MAX_PIXELS, LORALOOM_MAX_NODES, else the defaults shown)")
    group.add_argument(limits.flag("max_text_chars"), type=_whole(1), metavar="N",
                       help=f"characters in one text input, e.g. a prompt (default {limits.DEFAULT_MAX_TEXT_CHARS})")
    group.add_argument(limits.flag("max_pixels"), type=_whole(1), metavar="N",
                       help=f"width x height x batch_size of one Sample (default {limits.DEFAULT_MAX_PIXELS})")
    group.add_argument(limits.flag("max_nodes"), type=_whole(1), metavar="N",
                       help=f"nodes in one workflow (default {limits.DEFAULT_MAX_NODES})")


def _disk_cache_args(parser: argparse.ArgumentParser, budget: bool = True) -> None:
    from .graph_runtime.diskcache import DEFAULT_DISK_CACHE_BYTES

    group = parser.add_argument_group("disk cache of merge results, shared by every process (else "
                                      "LORALOOM_DISK_CACHE_DIR, LORALOOM_DISK_CACHE_BYTES, else "
                                      "~/.cache/loraloom/results and the default shown)")
    group.add_argument("--disk-cache-dir", metavar="DIR", help="the disk cache's folder")
    if budget:
        group.add_argument("--disk-cache-bytes", type=_whole(0), metavar="N",
                           help=f"its byte budget, least recently used entries evicted beyond it; 0: off "
                                f"(default {DEFAULT_DISK_CACHE_BYTES})")
        group.add_argument("--no-disk-cache", action="store_true",
                           help="neither read nor write the disk cache (the same as --disk-cache-bytes 0)")


def _disk_cache_kwargs(args) -> dict:
    """The Runtime keywords for the disk cache flags given (the others come from the environment)."""
    extra = {}
    if args.disk_cache_dir is not None:
        extra["disk_cache_dir"] = args.disk_cache_dir
    if args.no_disk_cache:
        extra["disk_cache_bytes"] = 0
    elif args.disk_cache_bytes is not None:
        extra["disk_cache_bytes"] = args.disk_cache_bytes
    return extra


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraloom",
        description="LoRA Loom: load, blend, merge, fuse, compile and sample LoRAs on diffusion models "
                    "as a cached node graph. Workflows are ComfyUI JSON (API or UI format).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser("run", help="run a workflow headless",
                         description="Validate and run a workflow (.json in API or UI format, or a PNG "
                                     "that carries one). Progress goes to stderr: bars on a terminal, else a "
                                     "line per node finished.")
    run.add_argument("workflow", help="workflow file (.json or .png)")
    run.add_argument("--set", action="append", default=[], metavar="ID.INPUT=VALUE", type=_set_arg,
                     help="override an input; VALUE is JSON (0.5, true, \"text\") or else a plain string")
    run.add_argument("--events", choices=["jsonl"], help="print one JSON object per event on stdout")
    run.add_argument("--no-progress", action="store_true",
                     help="no progress on stderr: neither ours nor the libraries' loading and saving bars")
    run.add_argument("--cache-bytes", type=_whole(0), metavar="N", help="byte budget of the result cache")
    run.add_argument("--strict-files", action="store_true",
                     help="hash every file's content on every use instead of trusting an unchanged size, mtime, "
                          "ctime and inode, and fail a node whose file changed while the run used it (what "
                          "`serve` always does; slower for large files)")
    _folder_args(run)
    _limit_args(run)
    _disk_cache_args(run)

    sweep = sub.add_parser("sweep", help="render a workflow over axes of input values: an XY grid",
                           description="Run a workflow once per cell of a grid of input values on one warm "
                                       "runtime (loaded LoRAs, merges and patched weights reused), and write each "
                                       "cell's image, a labelled grid per Z value and a manifest under --out. Every "
                                       "cell is validated first; a failing cell is recorded and the rest run; "
                                       "running the same sweep again skips its finished cells.")
    sweep.add_argument("workflow", help="workflow file (.json or .png)")
    sweep.add_argument("--axis", dest="axes", action=_AxisAction, type=_axis_arg, metavar="ID.INPUT=V1,V2,...",
                       help="one axis (repeatable; first X, second Y, the rest Z); values typed by the input "
                            "(0.5, true, text) or a JSON list: --axis '4.weight=[0, 0.5, 1]'")
    sweep.add_argument("--zip", dest="axes", action=_AxisAction, type=_axis_arg, nargs="+",
                       metavar="ID.INPUT=V1,V2,...", help="one axis moving several inputs together (each gets its "
                                                          "i-th value at position i; repeatable)")
    sweep.add_argument("--seeds", metavar="S1,S2,...", help="one more axis, last: these values for every seed input")
    sweep.add_argument("--set", action="append", default=[], metavar="ID.INPUT=VALUE", type=_set_arg,
                       help="override an input in every cell; VALUE as in `run`")
    sweep.add_argument("--out", metavar="DIR", help="the sweep's folder (default OUTPUT/sweeps/<workflow>-<hash>)")
    sweep.add_argument("--no-resume", action="store_true", help="run every cell, also those finished before")
    sweep.add_argument("--ray", nargs="?", const="", metavar="ADDRESS", help="run the cells on a Ray cluster: "
                       "ADDRESS (auto, HOST:6379, ray://HOST:10001), or a local one started here (needs loraloom[ray])")
    sweep.add_argument("--no-progress", action="store_true", help="no progress on stderr")
    sweep.add_argument("--cache-bytes", type=_whole(0), metavar="N", help="byte budget of the result cache")
    _folder_args(sweep)
    _limit_args(sweep)
    _disk_cache_args(sweep)

    val = sub.add_parser("validate", help="check a workflow without running it")
    val.add_argument("workflow")
    val.add_argument("--set", action="append", default=[], metavar="ID.INPUT=VALUE", type=_set_arg)
    val.add_argument("--json", action="store_true", help="print ComfyUI's node_errors JSON")
    _folder_args(val)
    _limit_args(val)

    nodes = sub.add_parser("nodes", help="list the available nodes")
    nodes.add_argument("--json", action="store_true", help="print the full object_info JSON")
    nodes.add_argument("--markdown", action="store_true", help="print a Markdown reference of every node")
    _folder_args(nodes)

    sub.add_parser("fixtures", help="write tiny test LoRAs for the built-in presets in every format "
                                    "(loraloom fixtures OUT_DIR [--preset P] [--seed N] [--demo])", add_help=False)

    conv = sub.add_parser("convert", help="convert a workflow between the UI (editor) and API formats")
    conv.add_argument("workflow", help="UI-format or API-format workflow (or a PNG that carries one)")
    conv.add_argument("-o", "--output", metavar="OUT.json", help="write here (atomically); default stdout")
    conv.add_argument("--to", choices=["api", "ui"], default="api",
                      help="api (default): what `run` and ComfyUI's /prompt take; ui: opens in the editor")
    _folder_args(conv)

    serve = sub.add_parser("serve", help="the visual editor and a ComfyUI-compatible API on this machine",
                           description="Serve ComfyUI's web frontend and the part of ComfyUI's HTTP + websocket "
                                       "API it and API clients use, running workflows on this runtime. Needs "
                                       "pip install 'loraloom[editor]'.")
    serve.add_argument("--listen", default="127.0.0.1", metavar="ADDR",
                       help="address to bind (default 127.0.0.1; any other needs a token)")
    # The port's range (0 picks a free one) is checked where it is bound, with a free port to suggest.
    serve.add_argument("--port", type=_whole(None), default=8188, metavar="N", help="port (default 8188, ComfyUI's)")
    serve.add_argument("--token", metavar="T", help="require this token on every request (else "
                                                    "LORALOOM_SERVE_TOKEN); open http://HOST:PORT/?token=T")
    serve.add_argument("--allow-host", action="append", default=[], metavar="H",
                       help="also accept this host name in requests' Host header (repeatable)")
    serve.add_argument("--user-dir", metavar="DIR", help="settings, saved workflows, queue and history (else "
                                                         "LORALOOM_USER_DIR, else ~/.local/share/loraloom)")
    serve.add_argument("--ray", nargs="?", const="", metavar="ADDRESS", help="run queued sweeps' cells on a Ray "
                       "cluster: ADDRESS, or a local one started here (needs loraloom[ray])")
    serve.add_argument("--cache-bytes", type=_whole(0), metavar="N", help="byte budget of the result cache")
    serve.add_argument("--max-connections", type=_whole(1), metavar="N",
                       help="open connections at most (the oldest idle one is closed for a new one)")
    serve.add_argument("--header-timeout", type=_positive(float), metavar="S",
                       help="seconds a connection may take to send a request head")
    serve.add_argument("--body-timeout", type=_positive(float), metavar="S",
                       help="seconds a request may take to send its body")
    _folder_args(serve)
    _limit_args(serve)
    _disk_cache_args(serve)

    cache = sub.add_parser("cache", help="show or clear the disk cache of merge results",
                           description="The disk cache keeps the results of merges (PeftMerge) between "
                                       "processes, so a second run of a workflow does not merge again.")
    cache.add_argument("action", choices=["info", "clear"], help="info: its folder, entries, bytes and budget; "
                                                                 "clear: delete every entry")
    _disk_cache_args(cache, budget=False)
    return parser


def _positive(kind):
    """An argparse type: a finite number of ``kind`` above 0."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"{text!r} must be a finite number above 0")
        return value

    return parse


def parse_sets(items: list[str]) -> dict:
    """``["3.weight=0.5", "5.text=a cat"]`` -> ``{"3.weight": 0.5, "5.text": "a cat"}``."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        node_id, dot, name = key.partition(".")
        if not (sep and dot and node_id and name):
            raise WorkflowError(f"--set {item!r}: expected ID.INPUT=VALUE, e.g. --set 4.weight=0.8", value=item,
                                kind="bad_override")
        try:
            value = loads_strict(raw, source=f"--set {key}")
        except WorkflowError as exc:
            if exc.kind == "overflow":  # a number too large for a float was meant as a number: refuse it
                raise
            value = raw  # anything else that is not JSON is text, e.g. --set 5.text=a cat
        out[key] = value
    return out


def _set_arg(text: str) -> tuple[str, object]:
    """An argparse type: one ``--set ID.INPUT=VALUE`` as ``(key, value)``; a malformed one is a usage error."""
    try:
        ((key, value),) = parse_sets([text]).items()
    except WorkflowError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--set ")) from None
    return key, value


def _axis_arg(text: str) -> str:
    """An argparse type: a well-formed ``ID.INPUT=V1,V2`` (typed later, by the workflow's schema)."""
    from .sweep.spec import parse_axis

    try:
        parse_axis(text)
    except WorkflowError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


class _AxisAction(argparse.Action):
    """``--axis`` and ``--zip`` into one list, in the order given (a zip is a list of several)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest, None) or []), values])


def _usage_error(exc: LoomError, args) -> bool:
    """Whether ``exc`` is about the command line itself rather than what a workflow holds: an override of
    a node the workflow lacks, a ``--nodes-module`` that does not exist, a workflow path that cannot be
    opened (missing, or not this user's to read)."""
    if exc.kind in ("bad_override", "override_unknown_node", "node_module_missing", "bad_axis"):
        return True
    workflow = getattr(args, "workflow", None)
    return exc.kind == "unreadable" and workflow is not None and exc.file == str(workflow)


def _runtime(args, **extra):
    from .api import Runtime, is_shipped_workflow, load_node_modules
    from .graph_runtime import Limits

    load_node_modules(args.nodes_module)
    limits = Limits.configure(**{name: getattr(args, name, None)
                                 for name in ("max_text_chars", "max_pixels", "max_nodes")})
    # The demo LoRAs are there for the shipped workflows only: never in the LoRA list otherwise.
    return Runtime(lora_dirs=args.lora_dir, models_dir=args.models_dir, output_dir=args.output_dir,
                   demo_loras=is_shipped_workflow(getattr(args, "workflow", None)), limits=limits, **extra)


class _Bars:
    """tqdm bars on stderr, a terminal: one for nodes, one for steps inside the running node."""

    def __init__(self):
        self.nodes = None
        self.steps = None

    def __call__(self, event: dict) -> None:
        from tqdm import tqdm

        kind = event["event"]
        if kind == "execution_plan":
            self.nodes = tqdm(total=len(event["nodes"]), desc="nodes", unit="node", file=sys.stderr, position=0)
        elif kind == "executing" and self.nodes is not None:
            self.nodes.set_postfix_str(f"{event['node']} {event['class_type']}")
        elif kind == "progress":
            if self.steps is None or self.steps.total != event["max"]:
                self._close_steps()
                self.steps = tqdm(total=event["max"], desc=f"  {event['class_type']}", unit="step",
                                  file=sys.stderr, position=1, leave=False)
            self.steps.n = event["value"]
            self.steps.refresh()
        elif kind == "executed":
            self._close_steps()
            if self.nodes is not None:
                self.nodes.update(1)
        elif kind in ("execution_success", "execution_error", "execution_interrupted"):
            self._close_steps()
            if self.nodes is not None:
                self.nodes.close()

    def _close_steps(self):
        if self.steps is not None:
            self.steps.close()
            self.steps = None


class _LogLines:
    """Progress on stderr that is no terminal (a log file, a pipe): a plain line per node finished,
    none per step; bars would fill a log with carriage returns and cursor moves."""

    def __init__(self):
        self.done = 0
        self.total = 0

    def __call__(self, event: dict) -> None:
        kind = event["event"]
        if kind == "execution_cached":
            disk = event.get("disk", [])
            memory = [n for n in event["nodes"] if n not in disk]
            if memory:
                print(f"cached: node {', '.join(memory)}", file=sys.stderr, flush=True)
            if disk:
                print(f"cached (disk): node {', '.join(disk)}", file=sys.stderr, flush=True)
        elif kind == "execution_plan":
            self.total = len(event["nodes"])
        elif kind == "executed":
            self.done += 1
            print(f"[{self.done}/{self.total}] node {event['node']} ({event['class_type']}) done in "
                  f"{event['seconds']:.1f} s", file=sys.stderr, flush=True)


def _print_note(event: dict) -> None:
    """A disk cache note (an entry discarded, a result not stored): one line on stderr."""
    if event["event"] == "cache_note":
        print(f"note: node {event['node']} ({event['class_type']}): {event['message']}", file=sys.stderr, flush=True)


def _print_jsonl(event: dict) -> None:
    sys.stdout.write(json.dumps(event, default=str) + "\n")
    sys.stdout.flush()


@contextlib.contextmanager
def _interrupt_on_sigint(rt):
    """Within the block a Ctrl-C asks ``rt`` to stop at the next node, step or layer; a second stops at once."""

    def on_sigint(signum, frame):
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once
        print("\ninterrupting (Ctrl-C again to stop at once)...", file=sys.stderr)
        rt.interrupt()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def cmd_run(args) -> int:
    from .api import library_progress_bars_off

    overrides = dict(args.set)
    extra = {"cache_bytes": args.cache_bytes} if args.cache_bytes is not None else {}
    rt = _runtime(args, strict_files=args.strict_files, **extra, **_disk_cache_kwargs(args))
    bars = not args.no_progress and sys.stderr.isatty()
    listeners = [_print_note] + ([] if args.no_progress else [_Bars() if bars else _LogLines()])
    if args.events == "jsonl":
        listeners.append(_print_jsonl)

    def on_event(event):
        for listener in listeners:
            listener(event)

    # the libraries' own bars (loading, writing shards) show only where ours do
    with _interrupt_on_sigint(rt), contextlib.nullcontext() if bars else library_progress_bars_off():
        result = rt.run(args.workflow, overrides, on_event=on_event)
    if args.events != "jsonl":
        disk = f" ({len(result.disk_cached)} from disk)" if result.disk_cached else ""
        print(f"done: {len(result.executed)} executed, {len(result.cached)} cached{disk}")
        for line in describe_outputs(result.outputs, rt.folders):
            print(line)
    return EXIT_OK


def _sweep_executor(args) -> tuple[str, str | None]:
    """The executor a ``sweep`` command asks for, and its address: "local" unless a ``--ray [ADDRESS]``
    flag (the Ray executor's, where installed) is given."""
    ray = getattr(args, "ray", None)
    return ("ray", ray or None) if ray is not None else ("local", None)


class _CellBar:
    """A sweep's progress on stderr: a tqdm bar of cells on a terminal, else a line per cell."""

    def __init__(self, bars: bool):
        self.bars = bars
        self.bar = None

    def __call__(self, record, done: int, total: int) -> None:
        where = ", ".join(f"{k}={json.dumps(v)}" for k, v in record.overrides.items())
        if not self.bars:
            state = "done" if record.ok else "FAILED"
            print(f"[{done}/{total}] cell {record.index} ({where}) {state} in {record.seconds:.1f} s", file=sys.stderr,
                  flush=True)
            return
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, initial=done - 1, desc="cells", unit="cell", file=sys.stderr)
        self.bar.set_postfix_str(where)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def cmd_sweep(args) -> int:
    from .api import library_progress_bars_off

    extra = {"cache_bytes": args.cache_bytes} if args.cache_bytes is not None else {}
    rt = _runtime(args, **extra, **_disk_cache_kwargs(args))
    workflow = rt.load(args.workflow, dict(args.set))  # --set applies to every cell
    bars = not args.no_progress and sys.stderr.isatty()
    progress = _CellBar(bars) if not args.no_progress else None
    executor, address = _sweep_executor(args)
    try:
        with _interrupt_on_sigint(rt), contextlib.nullcontext() if bars else library_progress_bars_off():
            result = rt.sweep(workflow, args.axes or [], seeds=args.seeds, out=args.out, executor=executor, address=address,
                              resume=not args.no_resume, node_modules=args.nodes_module or None, on_cell=progress)
    finally:
        if progress is not None:
            progress.close()
    records = result.records
    print(f"sweep: {len(records)} of {len(result.plan.cells)} cells ({len(result.ran)} run, {len(result.skipped)} "
          f"finished before, {len(result.failed)} failed) in {result.out}")
    for grid in result.grids:
        print(f"  grid: {grid}")
    for index in result.failed:
        error = records[index].error or {}
        message = error.get("exception_message") or error.get("message") or json.dumps(error)
        print(f"  cell {index} failed: {message}", file=sys.stderr)
    return EXIT_FAIL if result.failed else EXIT_OK


def _is_file_ref(value) -> bool:
    return isinstance(value, dict) and value.get("type") in ("output", "temp") \
        and isinstance(value.get("filename"), str) and isinstance(value.get("subfolder"), str)


def describe_outputs(outputs: dict, folders) -> list[str]:
    """What ``run`` prints for its output nodes: the full path of every file or folder each saved, its
    ``text`` lines below, and any other UI output as JSON (``--events jsonl`` has it all as data)."""
    lines = []
    for node_id, ui in outputs.items():
        saved = {key for key, value in ui.items() if isinstance(value, list) and value and all(map(_is_file_ref, value))}
        lines += [f"  node {node_id}: {folders.ref_root(ref['type']) / ref['subfolder'] / ref['filename']}"
                  for key in saved for ref in ui[key]]
        rest = {key: value for key, value in ui.items() if key not in saved and key != "text"}
        if rest or not saved:
            lines.append(f"  node {node_id}: {json.dumps(rest, default=str)}")
        lines += [f"    {text}" for text in ui.get("text", []) if isinstance(text, str)]
    return lines


def cmd_validate(args) -> int:
    rt = _runtime(args)
    try:
        valid = rt.validate(args.workflow, dict(args.set))
    except ValidationError as exc:
        if args.json:
            print(json.dumps(exc.to_json(), indent=2, default=str))
        else:
            print(f"{args.workflow}: invalid\n{exc.describe()}", file=sys.stderr)
        return EXIT_FAIL
    if args.json:
        print(json.dumps({"error": None, "node_errors": {}, "outputs": valid.outputs}))
    else:
        print(f"{args.workflow}: valid ({len(valid.nodes)} nodes, outputs {', '.join(valid.outputs)})")
    return EXIT_OK


def cmd_nodes(args) -> int:
    rt = _runtime(args)
    if args.json:
        print(json.dumps(rt.object_info(), indent=2, default=str))
        return EXIT_OK
    if args.markdown:
        sys.stdout.write(nodes_markdown(rt.registry))
        return EXIT_OK
    width = max(map(len, rt.registry), default=0)
    for class_id in rt.registry:
        schema = rt.registry.get(class_id).SCHEMA
        summary = schema.description.replace("\n", " ").split(". ")[0].rstrip(".")
        old = f" [old id {', '.join(schema.aliases)}]" if schema.aliases else ""
        print(f"{class_id:<{width}} {schema.category:<22} {summary}{old}")
    return EXIT_OK


def nodes_markdown(registry) -> str:
    """A Markdown reference of every node, from the same schema the runtime and ComfyUI use."""
    out = ["# Node reference", "", "Generated by `loraloom nodes --markdown` from the node schema.", ""]
    for class_id in registry:
        schema = registry.get(class_id).SCHEMA
        out += [f"## {class_id} ({schema.display_name})", "", schema.description.replace("\n", " "), ""]
        if schema.aliases:
            out += [f"Old id {', '.join(f'`{a}`' for a in schema.aliases)}: workflows saved with it still load and run "
                    "(ComfyUI lists it as deprecated).", ""]
        out += [f"Category `{schema.category}`" + (", output node" if schema.output_node else "")
                + ("" if schema.comfy_export else "; headless stand-in, not exported to ComfyUI") + ".", "",
                "| input | type | default | range / options | |", "|---|---|---|---|---|"]
        for inp in schema.ordered_inputs():
            if inp.type == "COMBO":
                opts = inp.options if not callable(inp.options) else None
                limits = ", ".join(f"`{o}`" for o in opts) if opts else "files in the configured folder"
            else:
                limits = " .. ".join(str(v) for v in (inp.min, inp.max)) if inp.min is not None else ""
            default = f"`{json.dumps(inp.default)}`" if inp.has_default else ""
            note = ("optional. " if inp.optional else "") + inp.tooltip.replace("|", "\\|")
            out.append(f"| `{inp.name}` | {inp.type} | {default} | {limits} | {note} |")
        outs = ", ".join(f"`{o.name or o.type}` ({o.type})" for o in schema.outputs) or "none (UI output only)"
        out += ["", f"Outputs: {outs}.", ""]
    return "\n".join(out)


def cmd_convert(args) -> int:
    from .graph_runtime.workflow import api_to_ui, with_titles

    rt = _runtime(args)
    prompt = rt.load(args.workflow).prompt
    data = api_to_ui(prompt, rt.registry) if args.to == "ui" else with_titles(prompt, rt.registry)
    text = json.dumps(data, indent=2) + "\n"
    if args.output:
        atomic_write_bytes(args.output, text.encode())
        print(f"wrote {args.output} ({len(prompt)} nodes)", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return EXIT_OK


def cmd_serve(args) -> int:
    try:
        from .server import ServerConfig, ServerConfigError, check_listen, serve
        from .server.app import ENV_TOKEN
        from .server.net import Limits
    except ImportError as exc:
        raise LoomError(f"`loraloom serve` needs the editor extra ({exc.name} is missing).", value=exc.name,
                        kind="missing_extra", fix="pip install 'loraloom[editor]'") from None
    config = ServerConfig(listen=args.listen, port=args.port, token=args.token or os.environ.get(ENV_TOKEN) or None,
                          allow_hosts=tuple(args.allow_host),
                          user_dir=Path(args.user_dir) if args.user_dir else None,
                          limits=Limits(**{name: getattr(args, name) for name in ("header_timeout", "body_timeout",
                                                                                  "max_connections")
                                           if getattr(args, name) is not None}),
                          **({"sweep_executor": "ray", "ray_address": args.ray or None} if args.ray is not None else {}))
    extra = {"cache_bytes": args.cache_bytes} if args.cache_bytes is not None else {}
    extra.update(_disk_cache_kwargs(args))
    try:
        check_listen(config.listen, config.token)  # before loading anything
        # A server runs for days and shares its cache among clients: it trusts no file state (see README).
        serve(_runtime(args, strict_files=True, **extra), config)
    except ServerConfigError as exc:  # an option it cannot honour: port in use, user folder in use, ...
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def cmd_cache(args) -> int:
    from .graph_runtime.diskcache import DiskCache

    store = DiskCache.configure(args.disk_cache_dir)
    if args.action == "clear":
        gone = store.clear()
        print(f"cleared {store.root}: {_entries(gone.entries)}, {_size(gone.nbytes)}")
        return EXIT_OK
    info = store.info()
    state = "off (budget 0)" if not store.enabled else f"budget {_size(info.max_bytes)}"
    print(f"disk cache: {info.root}\n  {_entries(info.entries)}, {_size(info.nbytes)}; {state}")
    return EXIT_OK


def _entries(n: int) -> str:
    return f"{n} entry" if n == 1 else f"{n} entries"


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB ({nbytes} bytes)"


COMMANDS = {"run": cmd_run, "sweep": cmd_sweep, "validate": cmd_validate, "nodes": cmd_nodes, "convert": cmd_convert,
            "serve": cmd_serve, "cache": cmd_cache}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``loraloom`` console script. Without ``argv`` (the console script, ``python -m
    loraloom.cli``) torch's threads wait passively (`_passive_threads`), and a ``run`` or ``sweep`` ends
    the process itself when it is done: see `_exit_now`."""
    if argv is None:
        _passive_threads()
    if argv is None and sys.argv[1:2] in (["run"], ["sweep"]):
        _exit_now(_main(sys.argv[1:]))
    return _main(sys.argv[1:] if argv is None else list(argv))


def _passive_threads() -> None:
    """``OMP_WAIT_POLICY=PASSIVE`` unless the user set it, before torch (and its OpenMP runtime, which
    reads it once, when loaded) is imported. By default an OpenMP thread that reaches the end of an op
    spins for its siblings; on a CPU whose cores other processes also use, a sibling is often not
    running, and the spinning holds the core it needs: a 20-step tiny-flux sample took 78-267 s on a
    busy 2-core machine against 3-6 s with passive waits at the same load. The number of threads and
    how work is split among them stay as they are, so images are bit for bit the same (checked on
    workflows/flux_blend.json); on an idle machine a waiting thread sleeps instead of spinning and is
    woken microseconds later."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _exit_now(code: int):
    """End the process without the interpreter's teardown. After a run that used torch, diffusers and
    transformers, freeing their thousands of modules' objects one by one took 1.3-1.6 s on a 2-core
    CPU, 15% of a first image (BENCHMARKS.md, row 8), and does nothing that the end of the process
    does not. What a normal exit does first still happens: the atexit handlers (logging's flush, a
    coverage tool's save) and the flush of stdout and stderr. With a thread other than a daemon still
    running, the normal exit (which waits for it) is kept."""
    if any(t is not threading.main_thread() and not t.daemon for t in threading.enumerate()):
        sys.exit(code)
    atexit._run_exitfuncs()  # CPython's own call at exit (private, there since Python 2)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe: nothing more can be said on it
            stream.flush()
    os._exit(code)


def _main(argv: list[str]) -> int:
    if argv[:1] == ["fixtures"]:  # its own parser, in the fixture generator's module
        from .fixtures import main as fixtures_main

        args, command = argparse.Namespace(command="fixtures"), lambda _: fixtures_main(argv[1:])
    else:
        args = build_parser().parse_args(argv)
        command = COMMANDS[args.command]
    try:
        return command(args)
    except ValidationError as exc:
        if getattr(args, "events", None) == "jsonl":
            _print_jsonl({"event": "validation_error", **exc.to_json()})
        print(f"{args.workflow}: invalid\n{exc.describe()}", file=sys.stderr)
        return EXIT_FAIL
    except (Interrupted, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except LoomError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE if _usage_error(exc, args) else EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
