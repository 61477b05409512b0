"""``optimum-cli export gemma4 SOURCE OUT_DIR``: the exporter where optimum users look for it.

optimum 2.3 finds extra commands in the ``optimum.commands.register`` namespace: every module there exposes
``REGISTER_COMMANDS``, a list of (command class, parent command class). A one-line module in that namespace,
``from gemma4_onnx.mobile.optimum_command import REGISTER_COMMANDS``, registers this one under ``export``.
Nothing heavy is imported until the command runs.
"""

from argparse import ArgumentParser

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo
from optimum.commands.export.base import ExportCommand


class Gemma4ExportCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="gemma4", help="Export Gemma 4 to an ONNX package (gemma4-onnx export), "
                                              "optionally quantized and packaged for ONNX Runtime Mobile.")

    @staticmethod
    def parse_args(parser: ArgumentParser) -> None:
        parser.add_argument("source", help="checkpoint directory or variant name")
        parser.add_argument("out_dir")
        parser.add_argument("--target", choices=["portable", "ort"], default="portable")
        parser.add_argument("--recipe", help="quantize while exporting (int8, int4, int4-mobile, FILE)")
        parser.add_argument("--mobile", action="store_true", help="also write OUT_DIR-mobile (ORT format)")
        parser.add_argument("--force", action="store_true")

    def run(self) -> None:
        from gemma4_onnx.cli import main

        args = self.args
        steps = [["export", args.source, args.out_dir, "--target", args.target,
                  *(["--recipe", args.recipe] if args.recipe else [])]]  # quantized in the same streaming pass
        if args.mobile:
            steps.append(["mobile", args.out_dir, f"{args.out_dir}-mobile"])
        for step in steps:
            code = main([*step, *(["--force"] if args.force else [])])
            if code:
                raise SystemExit(code)


REGISTER_COMMANDS = [(Gemma4ExportCommand, ExportCommand)]
