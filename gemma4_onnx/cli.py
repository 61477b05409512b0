"""The ``gemma4-onnx`` command. Each verb imports its stage lazily, so the deployment verbs
(generate, verify, mobile) never load torch or transformers."""

import argparse
import errno
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from gemma4_onnx import __version__
from gemma4_onnx.atomic import check_disjoint, check_file_target
from gemma4_onnx.errors import Gemma4OnnxError
from gemma4_onnx.memory import return_freed_memory
from gemma4_onnx.progress import say, set_quiet

Handler = Callable[[argparse.Namespace], int]
# What the filesystem answers for a path the user gave that cannot be used: one line, exit 2.
INPUT_ERRNOS = (errno.ENAMETOOLONG, errno.ELOOP, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM,
                errno.EROFS, errno.ENOENT, errno.ENXIO)


def cmd_variants(args: argparse.Namespace) -> int:
    from gemma4_onnx.exporter.variant_table import variant_rows

    rows = variant_rows()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = f"{'variant':<14} {'layers':<28} {'total':>8} {'embed':>7} {'PLE':>7} {'vision':>7} {'audio':>7} " \
             f"{'effect.':>8} {'LM':>8} {'active':>7}"
    print(header)
    for row in rows:
        c = row["parameters"]

        def g(key: str, c: dict = c) -> str:
            return "-" if not c[key] else f"{c[key] / 1e9:.3f}B"

        pattern = row["layer_pattern"]
        pattern = pattern if len(pattern) <= 28 else pattern[:25] + "..."
        print(f"{row['name']:<14} {pattern:<28} {g('total'):>8} {g('embedding'):>7} {g('ple'):>7} "
              f"{g('vision'):>7} {g('audio'):>7} {g('effective'):>8} {g('language_model'):>8} {g('active'):>7}")
    return 0


def cmd_init_checkpoint(args: argparse.Namespace) -> int:
    from gemma4_onnx.exporter.init_checkpoint import init_checkpoint

    out = init_checkpoint(args.variant, Path(args.out_dir), seed=args.seed, dtype=args.dtype, force=args.force)
    say(f"checkpoint: {out}")
    return 0


def _recipe_file(spec: str | None) -> str | None:
    """A recipe given as a file (an input an output must not touch); None for a built-in name."""
    return spec if spec and Path(spec).suffix == ".toml" else None


def cmd_export(args: argparse.Namespace) -> int:
    from gemma4_onnx.pipeline import export

    check_disjoint(Path(args.out_dir), args.source, args.calibration, _recipe_file(args.recipe))
    return_freed_memory()
    out = export(args.source, Path(args.out_dir), force=args.force, structure_only=args.structure_only,
                 target=args.target, recipe=args.recipe, budget_bits=args.budget_bits,
                 calibration=Path(args.calibration) if args.calibration else None,
                 calibration_tokens=args.calibration_tokens)
    say(f"package: {out}")
    return 0


def cmd_parity(args: argparse.Namespace) -> int:
    from gemma4_onnx.parity_run import run_parity, summary, write_report

    model_dir = Path(args.model_dir)
    out = Path(args.out) if args.out else model_dir.parent / f"{model_dir.name}.parity"
    check_disjoint(out, model_dir, args.checkpoint, args.text)
    check_file_target(out / "parity.json")
    if args.blocks:
        from gemma4_onnx.block_parity import run_block_parity

        result = run_block_parity(model_dir, args.checkpoint, args.layers, args.sequence)
    else:
        result = run_parity(model_dir, Path(args.checkpoint), Path(args.text) if args.text else None, args.steps)
    path = write_report(result, out)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        say(summary(result))
    say(f"parity: {path}")
    return 0 if result["passed"] else 1


def cmd_generate(args: argparse.Namespace) -> int:
    from gemma4_onnx.runtime.generate import generate

    generate(Path(args.model_dir), args.prompt, args.max_new_tokens, images=[Path(f) for f in args.image],
             audio=[Path(f) for f in args.audio], image_budget=args.image_budget, raw=args.raw)
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from gemma4_onnx.quantize.job import quantize_package

    check_disjoint(Path(args.out_dir), args.model_dir, args.calibration, _recipe_file(args.recipe))
    return_freed_memory()
    calibration = Path(args.calibration) if args.calibration else None
    out = quantize_package(Path(args.model_dir), Path(args.out_dir), args.recipe, force=args.force,
                           calibration=calibration, budget_bits=args.budget_bits,
                           calibration_tokens=args.calibration_tokens)
    say(f"quantized package: {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from gemma4_onnx.runtime.report import write_report

    directories, out = [Path(d) for d in args.report_dirs], Path(args.out or "build/report")
    check_disjoint(out, *directories)
    write_report(directories, out, force=args.force)
    say(f"report: {out / 'report.md'}, {out / 'report.html'}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from gemma4_onnx.verify import summary, verify_package, write_report

    if args.out:
        check_disjoint(Path(args.out), args.model_dir)
        check_file_target(Path(args.out))
    report = verify_package(Path(args.model_dir))
    if args.out:
        write_report(report, Path(args.out))
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        say(summary(report))
    return 0 if report["passed"] else 1


def cmd_mobile(args: argparse.Namespace) -> int:
    from gemma4_onnx.mobile.package import mobile_package

    check_disjoint(Path(args.out_dir), args.model_dir)
    if args.genai:
        from gemma4_onnx.mobile.genai import genai_package

        say(f"onnxruntime-genai folder: {genai_package(Path(args.model_dir), Path(args.out_dir), force=args.force)}")
        return 0
    out = mobile_package(Path(args.model_dir), Path(args.out_dir), force=args.force,
                         target_platform=args.target_platform, verbose=args.debug)
    say(f"mobile package: {out}")
    return 0


def _layer_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemma4-onnx", description=__doc__)
    parser.add_argument("--version", action="version", version=f"gemma4-onnx {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress bars or status lines")
    common.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
        sub = verbs.add_parser(name, parents=[common], help=help, description=help)
        sub.set_defaults(handler=handler)
        return sub

    p = verb("variants", cmd_variants, "list the variants with layer pattern and parameter counts")
    p.add_argument("--json", action="store_true")

    p = verb("init-checkpoint", cmd_init_checkpoint, "write a deterministic random checkpoint in HF layout")
    p.add_argument("variant")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")

    p = verb("export", cmd_export, "export a checkpoint directory or a variant name to ONNX")
    p.add_argument("source")
    p.add_argument("out_dir")
    p.add_argument("--recipe", help="quantize in the same pass, block by block (as `quantize` would the float "
                                     "export; float weights are never written): int8, int4, int4-mobile, auto or "
                                     "FILE.toml")
    p.add_argument("--budget-bits", type=float, help="with --recipe: as for quantize")
    p.add_argument("--calibration", help="with --recipe: as for quantize")
    p.add_argument("--calibration-tokens", type=int, help="with --recipe: as for quantize")
    p.add_argument("--force", action="store_true")
    p.add_argument("--target", choices=["portable", "ort"], default="portable",
                   help="portable: ai.gemma4 functions (any runtime); ort: onnxruntime's fused kernels where they fit")
    p.add_argument("--structure-only", action="store_true",
                   help="graphs, signatures and cache layout without weight data (cannot run)")

    p = verb("quantize", cmd_quantize, "quantize an exported package per a recipe")
    p.add_argument("model_dir")
    p.add_argument("out_dir")
    p.add_argument("--recipe", default="int4")
    p.add_argument("--calibration", help="UTF-8 text file for calibrated algorithms (default: built-in code text); "
                                         "only its start, as far as --calibration-tokens needs, is read")
    p.add_argument("--calibration-tokens", type=int,
                   help="calibration text tokens GPTQ's statistics are gathered over (default 16384; the cost of "
                        "gathering them grows with this, at full size it is minutes)")
    p.add_argument("--budget-bits", type=float,
                   help="average stored bits per linear weight to spend on the most sensitive tensors (needed by auto)")
    p.add_argument("--force", action="store_true")

    p = verb("parity", cmd_parity, "compare onnxruntime with transformers and write parity.json")
    p.add_argument("model_dir")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--text")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--blocks", action="store_true",
                   help="only per-block parity, one layer in memory at a time (any variant size); --checkpoint "
                        "may then be a variant name for packages exported from random weights")
    p.add_argument("--layers", type=_layer_list, help="with --blocks: comma-separated layer indices (default: all)")
    p.add_argument("--sequence", type=int, help="with --blocks: tokens per block (default: sliding window + 8)")
    p.add_argument("--out")
    p.add_argument("--json", action="store_true")

    p = verb("report", cmd_report, "render parity reports side by side")
    p.add_argument("report_dirs", nargs="+")
    p.add_argument("--out", help="the folder to write report.md and report.html to (default build/report)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out folder")

    p = verb("generate", cmd_generate, "generate text with an exported package")
    p.add_argument("model_dir")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64,
                   help="tokens to generate at most (default 64); capped, with a note, at what the model's context "
                        "leaves after the prompt")
    p.add_argument("--image", action="append", default=[], metavar="FILE",
                   help="an image (repeatable); placed at each <|image|> in the prompt, else before the text")
    p.add_argument("--image-budget", type=int, default=280,
                   help="soft tokens per image at most: 70, 140, 280 (default), 560 or 1120")
    p.add_argument("--audio", action="append", default=[], metavar="FILE",
                   help="a 16 kHz WAV file (repeatable; E2B/E4B); placed at each <|audio|>, else before the text")
    p.add_argument("--raw", action="store_true",
                   help="send the prompt as it is, without the checkpoint's chat template (if it has one)")

    p = verb("mobile", cmd_mobile, "package an export for ONNX Runtime Mobile")
    p.add_argument("model_dir")
    p.add_argument("out_dir")
    p.add_argument("--target-platform", choices=["arm", "amd64"], default="arm",
                   help="optimize the .ort graphs for this CPU (arm: phones; amd64: x86 edge boxes)")
    p.add_argument("--genai", action="store_true",
                   help="write a folder onnxruntime-genai runs instead (model.onnx + genai_config.json); its cache "
                        "costs more memory than ours: see the folder's README.md")
    p.add_argument("--force", action="store_true")

    p = verb("verify", cmd_verify, "check a package's files, checksums, external data and graphs; exit 0 only when "
             "every check passes, 1 when any fails")
    p.add_argument("model_dir")
    p.add_argument("--json", action="store_true", help="print the JSON report on stdout instead of the summary")
    p.add_argument("--out", help="also write the JSON report to this file")
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as an interruption: cleanups run as on Ctrl-C (scratch folders removed, a resumable
    export's completed blocks kept for the next run)."""


def interrupt_on_sigterm(signum: int, frame: object) -> None:
    raise Terminated


WATCHER = "gemma4-onnx-exit-when-stuck"
STUCK_SECONDS = 10.0  # after a signal, how long the main thread may stay in native code before the process exits


def exit_when_stuck() -> None:
    """Python runs a signal handler only when the main thread is back in the interpreter: inside onnxruntime
    (a hostile graph's endless Loop) SIGTERM and Ctrl-C would never arrive. The C-level handler writes the
    signal to a pipe; a watcher thread gives the handler ``STUCK_SECONDS``, then ends the process as the
    signal would (a staging folder left behind is removed by the next command writing that output)."""
    if any(t.name == WATCHER for t in threading.enumerate()) or threading.current_thread() is not \
            threading.main_thread():
        return
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    signal.set_wakeup_fd(write_end)

    def watch() -> None:
        while (signum := os.read(read_end, 1)[0]) not in (signal.SIGTERM, signal.SIGINT):
            pass
        time.sleep(STUCK_SECONDS)
        os._exit(128 + signum)

    threading.Thread(target=watch, name=WATCHER, daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    set_quiet(args.quiet)
    if not args.debug:
        logging.disable(logging.WARNING)  # libraries' warnings (onnx_ir's deduplication notes) are not ours to print
    signal.signal(signal.SIGTERM, interrupt_on_sigterm)
    exit_when_stuck()
    try:
        return int(args.handler(args))
    except BaseException as exc:
        if args.debug and not isinstance(exc, KeyboardInterrupt):
            raise
        code, message = outcome(exc)
        if message is None:
            raise
        if message:
            print(f"gemma4-onnx {args.verb}: {one_line(message)}", file=sys.stderr)
        return code


def outcome(exc: BaseException) -> tuple[int, str | None]:
    """The exit status and the message of an exception that ended a verb (None: not ours to explain)."""
    if any(isinstance(e, Terminated) for e in _chain(exc)):  # torch may wrap it in its own error
        return 128 + signal.SIGTERM, ""
    if isinstance(exc, Gemma4OnnxError):
        return exc.exit_code, f"error: {exc}"
    if isinstance(exc, KeyboardInterrupt):
        return 130, "interrupted"
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    if type(exc).__name__ == "PanicException":  # pyo3's (a tokenizer's Rust code): a BaseException
        return 2, f"error: the package's tokenizer failed on this text ({first})"
    if not isinstance(exc, Exception):
        return 1, None
    if type(exc).__module__.startswith("onnxruntime"):
        return 2, (f"error: onnxruntime cannot run this package ({type(exc).__name__}: {first}); "
                   "`gemma4-onnx verify` checks it")
    if isinstance(exc, OSError) and exc.errno in INPUT_ERRNOS:
        where = f": {os.fsdecode(exc.filename)[:300]!r}" if exc.filename is not None else ""
        return 2, f"error: {exc.strerror}{where}"
    return 1, f"internal error: {type(exc).__name__}: {exc} (rerun with --debug)"


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen and len(seen) < 32:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def one_line(message: str) -> str:
    """``message`` on one line: control characters (a newline or an escape sequence in a name someone else
    wrote) shown as escapes."""
    return "".join(c if c.isprintable() or c == " " else ascii(c)[1:-1] for c in message)


if __name__ == "__main__":
    sys.exit(main())
