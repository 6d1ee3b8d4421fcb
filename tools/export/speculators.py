"""The `speculators` export format: Eagle3 drafts as speculators' Eagle3Speculator config and tensors."""
from tools.export.base import EXPORTS, Exporter


class SpeculatorsExporter(Exporter):
    name = "speculators"
    layouts = {"eagle3_llama": "tools.export.eagle3"}


EXPORTS.register("speculators")(SpeculatorsExporter())
