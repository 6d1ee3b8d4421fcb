"""The `sglang` export format: Eagle3 drafts as SGLang's LlamaForCausalLMEagle3 (1 layer, no EAGLE 3.1
switches)."""
from tools.export.base import EXPORTS, Exporter


class SglangExporter(Exporter):
    name = "sglang"
    layouts = {"eagle3_llama": "tools.export.eagle3"}


EXPORTS.register("sglang")(SglangExporter())
