"""The `vllm` export format: Eagle3 drafts as vLLM's Eagle3 heads (`method: eagle3`), DFlash drafts as its
DFlashDraftModel (`method: dflash`)."""
from tools.export.base import EXPORTS, Exporter


class VllmExporter(Exporter):
    name = "vllm"
    layouts = {"eagle3_llama": "tools.export.eagle3", "dflash": "tools.export.dflash"}


EXPORTS.register("vllm")(VllmExporter())
