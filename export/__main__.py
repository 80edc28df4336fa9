"""``python -m export``: command line for :func:`export.export_artifact`."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from orthserve.cli import HelpFormatter, add_debug_flag

    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__, formatter_class=HelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", metavar="RUN_DIR", help="training run directory to export")
    source.add_argument("--model", metavar="NAME", help="plain zero-shot export of an open_clip / orthserve model")
    parser.add_argument("--pretrained", default=None, help="with --model: open_clip tag, checkpoint file, "
                        "'default' (orthserve-mini's embedded weights, its default) or 'none' (random weights); "
                        "required for other models")
    classes = parser.add_mutually_exclusive_group()
    classes.add_argument("--classnames", metavar="FILE", help="with --model: class-names file, '<id> <readable name>' "
                         "per line (a one-word line is both; docs/CLASSNAMES.md)")
    classes.add_argument("--labels", help="with --model: class names as a JSON list or separated by commas")
    parser.add_argument("--template", action="append", dest="templates", metavar="TEXT",
                        help="with --model: prompt template with {} (repeatable); default: 'a photo of a {}.'")
    parser.add_argument("--out", required=True, metavar="ART_DIR", help="artifact directory (replaced if it exists)")
    parser.add_argument("--fp16", action="append_const", const="fp16", dest="variants", help="also write fp16 graphs")
    parser.add_argument("--int8", action="append_const", const="int8", dest="variants",
                        help="also write dynamically quantized int8 graphs")
    parser.add_argument("--variant", action="append", dest="variants", metavar="NAME",
                        help="extra variant by name (fp16, int8); repeatable")
    parser.add_argument("--images", metavar="DIR", help="verification images (default: ../shared/data, else generated)")
    parser.add_argument("--opset", type=int, help="ONNX opset (>= 17; default 18)")
    parser.add_argument("--bento-model", metavar="NAME", help="also store the artifact in the BentoML model store")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if args.run and (args.classnames or args.labels or args.templates or args.pretrained is not None):
        parser.error("--classnames, --labels, --template and --pretrained go with --model; a run has its own")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    from orthserve.artifact import PARITY_FILE
    from orthserve.prompts import DEFAULT_TEMPLATES
    from orthserve.models import WeightsUnavailableError, resolve_pretrained

    from . import ExportError, export_artifact, from_model, from_run
    from orthserve.classnames import parse_labels, read_classnames
    from .towers import DEFAULT_OPSET, check_opset, check_variants
    from .verify import describe_variants

    try:
        variants = check_variants(args.variants or [])  # user errors first, before loading a model
        opset = check_opset(args.opset or DEFAULT_OPSET)
        if args.bento_model:
            from .bento import check_name

            check_name(args.bento_model)
        if args.run:
            source = from_run(args.run)
        else:
            names: list[str] = []
            if args.classnames:
                names = list(read_classnames(args.classnames).values())
            elif args.labels:
                names = parse_labels(args.labels)
            templates = args.templates or list(DEFAULT_TEMPLATES)
            if names and any("{}" not in t for t in templates):
                raise ValueError("every --template needs a {} where the class name goes")
            pretrained = resolve_pretrained(args.model, args.pretrained)
            if pretrained == "none":
                print("export: warning: random weights (--pretrained none): the artifact's answers mean nothing",
                      file=sys.stderr)
            source = from_model(args.model, pretrained, names, templates)
        manifest = export_artifact(source, args.out, variants, args.bento_model, args.images, opset=opset)
    except (ExportError, WeightsUnavailableError, FileNotFoundError, ValueError) as err:
        if args.debug:
            raise
        print(f"export: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("export: interrupted; nothing was written", file=sys.stderr)
        return 130
    parity = json.loads((Path(args.out) / PARITY_FILE).read_text())
    summary = {"out": str(args.out), "model": manifest["model"], "method": manifest["method"],
               "classes": len(manifest["classnames"]), "max_abs_diff": {c: parity[c]["max_abs_diff"] for c in ("image", "text")},
               "variants": parity["variants"], "bento_tag": manifest.get("bento_tag")}
    print(json.dumps(summary, indent=2))
    for line in describe_variants(parity["variants"]):  # for people: stdout stays one JSON document
        print(line, file=sys.stderr)
    return 0


def console() -> None:
    """The ``orthserve-export`` console script; ``python -m export`` from the repo root."""
    # SIGTERM unwinds like Ctrl-C, so the temporary directory is removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    sys.exit(main())


if __name__ == "__main__":
    console()
