"""`aerie plan`: per-rank GPU memory of online and offline training, and the smallest setup that fits.

The model counts bytes per component: the frozen target (whole, or 1/world under ZeRO-3 plus the layer
being gathered), its no-grad forward activations (one decoder layer at a time), the teacher logits (one
chunk x V, then L x Vd kept for the loss), the draft's weights, gradients, fp32 master and Adam moments
(partitioned across ranks by ZeRO), the activations the TTT unroll keeps for backward (coefficients measured
with saved-tensor hooks on models.draft.ttt: bytes per token per step), and a framework constant.
Architecture numbers of the conf/target presets are tabled below (no hub access needed); a local target
is read from its config.json and counted on the meta device.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

GIB = 1 << 30
DS_OPTIONS = ("zero2", "zero3", "zero3_offload")


@dataclass
class PlanConfig:
    gpu_memory_gb: Optional[float] = None    # None -> cluster.gpu_memory_gb
    gpus_per_node: Optional[int] = None      # None -> cluster.gpus_per_node
    max_world_size: int = 512
    seq_len: Optional[int] = None            # tokens per micro-batch; None -> trainer.max_tokens_per_batch
    mode: str = "auto"                       # online | offline | auto (both; online recommended when it fits)
    target_config_json: str = ""             # read this config.json instead of
                                             # target.path's / the preset table
    overhead_gb: float = 2.0                 # per rank: CUDA context, NCCL buffers, allocator slack
    json: bool = False                       # print JSON instead of the tables


@dataclass(frozen=True)
class TargetArch:
    """What the planner needs to know about a target (text decoder sizes; num_params includes encoders)."""
    num_layers: int
    hidden_size: int
    intermediate_size: int                   # dense MLP width
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    num_params: int
    num_experts: int = 0                     # routed experts per MoE layer (0: dense)
    num_experts_per_token: int = 0
    moe_intermediate_size: int = 0
    num_shared_experts: int = 0
    num_active_params: Optional[int] = None
    max_layer_params: Optional[int] = None   # largest decoder layer; None -> from the sizes above
    dtype_bytes: int = 2                     # checkpoint dtype (for target.dtype=auto)

    def attention_params(self) -> int:
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        return 2 * self.hidden_size * q + 2 * self.hidden_size * kv

    def layer_params(self) -> int:
        if self.max_layer_params is not None:
            return self.max_layer_params
        mlp = 3 * self.hidden_size * self.intermediate_size
        if self.num_experts:
            experts = self.num_experts + self.num_shared_experts
            mlp = max(mlp, 3 * self.hidden_size * self.moe_intermediate_size * experts
                      + self.num_experts * self.hidden_size)
        return self.attention_params() + mlp

    def active_intermediate(self) -> int:
        """MLP width one token goes through (routed top-k plus shared experts for MoE)."""
        if not self.num_experts:
            return self.intermediate_size
        moe = self.moe_intermediate_size * (self.num_experts_per_token + self.num_shared_experts)
        return max(self.intermediate_size, moe)


# Public config.json numbers of the conf/target presets, keyed by hub id.  DeepSeek-V3's MLA is written as
# 128 heads of 192 (q/k) dims; its params exclude the multi-token-prediction layer.
PRESET_ARCHS: Dict[str, TargetArch] = {
    "meta-llama/Llama-3.1-8B-Instruct": TargetArch(32, 4096, 14336, 32, 8, 128, 128256, 8_030_261_248),
    "meta-llama/Llama-3.3-70B-Instruct": TargetArch(80, 8192, 28672, 64, 8, 128, 128256, 70_553_706_496),
    "meta-llama/Llama-3.1-405B-Instruct": TargetArch(126, 16384, 53248, 128, 8, 128, 128256, 405_853_388_800),
    "Qwen/Qwen3-8B": TargetArch(36, 4096, 12288, 32, 8, 128, 151936, 8_190_735_360),
    "Qwen/Qwen3-32B": TargetArch(64, 5120, 25600, 64, 8, 128, 151936, 32_762_123_264),
    "Qwen/Qwen3-235B-A22B": TargetArch(94, 4096, 12288, 64, 4, 128, 151936, 235_093_634_560, num_experts=128,
                                       num_experts_per_token=8, moe_intermediate_size=1536,
                                       num_active_params=22_000_000_000),
    "Qwen/Qwen2.5-VL-7B-Instruct": TargetArch(28, 3584, 18944, 28, 4, 128, 152064, 8_292_166_656),
    "Qwen/Qwen2-Audio-7B-Instruct": TargetArch(32, 4096, 11008, 32, 32, 128, 156032, 8_397_094_912),
    # Qwen3-VL / Qwen3-ASR: parameters counted on the meta device from their config.json numbers (text +
    # tower)
    "Qwen/Qwen3-VL-8B-Instruct": TargetArch(36, 4096, 12288, 32, 8, 128, 151936, 8_767_123_696),
    "Qwen/Qwen3-ASR-1.7B": TargetArch(28, 2048, 6144, 16, 8, 128, 151936, 2_038_052_480),
    "canopylabs/orpheus-3b-0.1-ft": TargetArch(28, 3072, 8192, 24, 8, 128, 156940, 3_300_867_072),
    "deepseek-ai/DeepSeek-V3": TargetArch(61, 7168, 18432, 128, 128, 192, 129280, 671_026_419_200,
                                          num_experts=256, num_experts_per_token=8,
                                          moe_intermediate_size=2048, num_shared_experts=1,
                                          num_active_params=37_000_000_000),
}


def arch_from_hf_config(config) -> TargetArch:
    """A TargetArch from a transformers config: the model is built on the meta device to count parameters."""
    from models.targets.base import TargetConfig
    from models.targets.meta import decoder_of, meta_model

    module = meta_model(config, TargetConfig())
    decoder = decoder_of(module)
    text = decoder.config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    num_experts = int(getattr(text, "num_experts", None) or getattr(text, "n_routed_experts", None) or 0)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return TargetArch(
        num_layers=len(decoder.layers), hidden_size=text.hidden_size,
        intermediate_size=int(getattr(text, "intermediate_size", 0) or 0), num_attention_heads=heads,
        num_key_value_heads=getattr(text, "num_key_value_heads", None) or heads, head_dim=head_dim,
        vocab_size=text.vocab_size, num_params=sum(p.numel() for p in module.parameters()),
        num_experts=num_experts, num_experts_per_token=int(getattr(text, "num_experts_per_tok", 0) or 0),
        moe_intermediate_size=int(getattr(text, "moe_intermediate_size", 0) or 0),
        num_shared_experts=int(getattr(text, "n_shared_experts", 0) or 0),
        max_layer_params=max(sum(p.numel() for p in layer.parameters()) for layer in decoder.layers),
        dtype_bytes=4 if str(dtype).endswith("float32") else 2)


def resolve_arch(target_path: str, config_json: str = "") -> TargetArch:
    """The preset table entry for a hub id, else the config.json of `config_json` or of the local dir."""
    from transformers import AutoConfig

    source = config_json or target_path
    if not config_json and target_path in PRESET_ARCHS:
        return PRESET_ARCHS[target_path]
    if not Path(source).exists():
        raise ValueError(f"plan: target {source!r} is neither a preset hub id ({', '.join(PRESET_ARCHS)}) "
                         "nor a local dir/config.json; set plan.target_config_json=<path to config.json>")
    return arch_from_hf_config(AutoConfig.from_pretrained(source))


@dataclass
class MemoryBreakdown:
    """Bytes per rank by component, for one mode / DeepSpeed option / world size.

    Rows named in `phases` exist only during that phase of a step (target forward, TTT forward+backward,
    optimizer step); the peak is the resident rows plus the largest phase.
    """
    mode: str
    deepspeed: str
    world_size: int
    components: Dict[str, float] = field(default_factory=dict)
    phases: Dict[str, str] = field(default_factory=dict)   # transient row -> its phase
    store_bytes_per_step: float = 0.0       # offline: bytes read from the store per micro-batch

    def phase_totals(self) -> Dict[str, float]:
        totals: Dict[str, float] = {}
        for name, phase in self.phases.items():
            totals[phase] = totals.get(phase, 0.0) + self.components[name]
        return totals

    @property
    def total(self) -> float:
        resident = sum(v for name, v in self.components.items() if name not in self.phases)
        return resident + max(self.phase_totals().values(), default=0.0)

    def gib(self) -> Dict[str, float]:
        return {name: value / GIB for name, value in self.components.items()}

    def fits(self, gpu_memory_gb: float) -> bool:
        return self.total <= gpu_memory_gb * GIB


def _dtype_bytes(name: str, arch: TargetArch) -> int:
    from models.targets.base import DTYPES

    table = {"auto": arch.dtype_bytes,
             **{dtype: torch_dtype.itemsize for dtype, torch_dtype in DTYPES.items()}}
    if name not in table:
        raise ValueError(f"target.dtype {name!r} not one of {sorted(table)}")
    return table[name]


def draft_sizes(arch: TargetArch, draft_cfg, num_aux_layers: int) -> Dict[str, int]:
    """Resolved draft dims and parameter counts (trainable, frozen embedding), as the chain draft's
    layer_fields builds them (other architectures are sized alike up to their extra tensors)."""
    hidden = arch.hidden_size
    heads = draft_cfg.num_attention_heads or arch.num_attention_heads
    same_heads = heads == arch.num_attention_heads
    kv_heads = draft_cfg.num_key_value_heads or (arch.num_key_value_heads if same_heads else heads)
    head_dim = draft_cfg.head_dim or (arch.head_dim if same_heads else hidden // heads)
    inter = draft_cfg.intermediate_size or arch.intermediate_size
    vd = min(draft_cfg.draft_vocab_size, arch.vocab_size)
    q, kv = heads * head_dim, kv_heads * head_dim
    trainable = num_aux_layers * hidden * hidden + hidden * vd + hidden
    for index in range(draft_cfg.num_layers):
        width = 2 * hidden if index == 0 else hidden
        trainable += width * (q + 2 * kv) + q * hidden + 3 * hidden * inter \
            + (3 if index == 0 else 2) * hidden
    return dict(hidden=hidden, q=q, kv=kv, intermediate=inter, draft_vocab=vd, trainable=trainable,
                embedding=arch.vocab_size * hidden)


def ttt_activation_bytes(sizes: Dict[str, int], num_layers: int, ttt_steps: int, seq_len: int,
                         dtype_bytes: int, num_aux_layers: int, trained_fraction: float = 1.0) -> float:
    """Bytes the TTT unroll keeps for backward (lean attention: O(L) per step).

    Per token and step: the first layer keeps its fp32 norm inputs/outputs and the [embed; hidden] concat
    (8b + 12 bytes per hidden unit), q (2b), k/v (2.75b, plus 2b per earlier step for the stacked extra keys)
    and the MLP (4b per intermediate unit); later layers 4b + 8 per hidden unit, 2b per q/kv unit, 4b per
    intermediate unit; the loss keeps fp32 log-probs and teacher probs (8 bytes per draft-vocab entry) at the
    trained positions.  The fc input (num_aux x H) is kept once.
    """
    b, hidden, q, kv, inter = dtype_bytes, sizes["hidden"], sizes["q"], sizes["kv"], sizes["intermediate"]
    first = hidden * (8 * b + 12) + 2 * b * q + 2.75 * b * kv + 4 * b * inter
    later = hidden * (4 * b + 8) + 2 * b * (q + kv) + 4 * b * inter
    per_step = first + (num_layers - 1) * later + 8 * sizes["draft_vocab"] * trained_fraction
    stacked_keys = ttt_steps * (ttt_steps - 1) * kv * b * num_layers
    return seq_len * (ttt_steps * per_step + stacked_keys + num_aux_layers * hidden * b)


def plan_memory(arch: TargetArch, draft_cfg, trainer_cfg, ds_cfg, world_size: int, mode: str = "online",
                seq_len: Optional[int] = None, target_dtype: str = "bfloat16", num_aux_layers: int = 3,
                logits_chunk_size: int = 1024, store_layout: str = "compact", store_topk: int = 16,
                device: str = "cuda", overhead_gb: float = 2.0, ds_label: str = "",
                trained_fraction: float = 1.0) -> MemoryBreakdown:
    """Peak bytes per rank of one training step (mode online | offline | dump).

    device="cpu" models a CPU run (what the tests measure): no overlap_comm double buffer, the DeepSpeed
    gradient bucket only as large as the gradients written into it, fp32 unless trainer.precision=bf16.
    """
    from data.store.format import bytes_per_token

    if mode not in ("online", "offline", "dump"):
        raise ValueError(f"plan mode must be online, offline or dump, got {mode!r}")
    if world_size < 1:
        raise ValueError(f"plan world_size must be >= 1, got {world_size}")
    precision = trainer_cfg.precision
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"trainer.precision must be auto, bf16 or fp32, got {precision!r}")
    if precision == "auto":
        precision = "bf16" if device == "cuda" else "fp32"
    length = seq_len or trainer_cfg.max_tokens_per_batch
    stage, world = ds_cfg.zero_stage, world_size
    bd = 2 if precision == "bf16" else 4                      # the draft's (and, under bf16,
                                                              # the target's) dtype
    bt = 2 if precision == "bf16" else _dtype_bytes(target_dtype, arch)
    hidden, vocab = arch.hidden_size, arch.vocab_size
    sizes = draft_sizes(arch, draft_cfg, num_aux_layers)
    vd, trainable = sizes["draft_vocab"], sizes["trainable"]
    parts: Dict[str, float] = {}
    phases: Dict[str, str] = {}
    fwd, ttt, opt = "target forward", "TTT fwd+bwd", "optimizer step"
    chunk = min(logits_chunk_size, length)
    # full-vocab logits of one chunk (target dtype, then float32) and its normed fp32 hidden states
    teacher_chunk = chunk * (vocab * (bt + (4 if bt != 4 else 0)) + hidden * 4)

    if mode in ("online", "dump"):
        shard = 1.0 / world if stage == 3 else 1.0
        parts["target params"] = 0.0 if ds_cfg.offload_param else arch.num_params * bt * shard
        if stage == 3:
            largest = max(arch.layer_params(), vocab * hidden)
            parts["target gathered (ZeRO-3)"] = (largest + ds_cfg.stage3_prefetch_bucket_size) * bt
            phases["target gathered (ZeRO-3)"] = fwd
        q, kv = arch.num_attention_heads * arch.head_dim, arch.num_key_value_heads * arch.head_dim
        router = arch.num_experts * 4 if arch.num_experts else 0
        # one decoder layer at a time: residual stream, fp32 norm, then attention or MLP temporaries
        layer = (3 * hidden + max(4 * q + 3 * kv, 3 * arch.active_intermediate())) * bt \
            + 2 * hidden * 4 + router
        captured = (num_aux_layers + 2) * hidden * bt                 # aux layer inputs, embeds, last hidden
        parts["target activations"] = length * captured + max(length * layer, teacher_chunk) \
            + length * length * (1 + bt)                              # + the packed-document mask
        phases["target activations"] = fwd
        parts["teacher logits + aux states"] = length * (vd * 4 + 8 + num_aux_layers * hidden * bt)
    else:
        layout_full = store_layout == "full"
        parts["teacher logits + aux states"] = length * (vd * 4 + 8)
        if layout_full:
            parts["teacher head (norm + lm_head)"] = (vocab + 1) * hidden * bt
            parts["teacher chunk logits"] = teacher_chunk
            phases["teacher chunk logits"] = fwd
        per_token = num_aux_layers * hidden * 4 + (hidden * 4 if layout_full else store_topk * 12) + 40
        parts["store batch"] = length * per_token

    if mode != "dump":
        draft_shard = 1.0 / world if stage == 3 else 1.0
        optimizer_shard = 1.0 / world if stage >= 1 else 1.0
        offload = ds_cfg.offload_optimizer
        parts["draft weights"] = trainable * bd * draft_shard
        parts["draft embedding (frozen)"] = sizes["embedding"] * bd * draft_shard
        has_master = stage >= 1 or bd == 2
        parts["fp32 master"] = 0.0 if offload or not has_master else trainable * 4 * optimizer_shard
        parts["Adam moments"] = 0.0 if offload else trainable * 8 * optimizer_shard
        num_steps = getattr(draft_cfg, "ttt_steps", 1)  # a draft without a TTT unroll (DFlash): one pass
        parts["TTT activations"] = ttt_activation_bytes(sizes, draft_cfg.num_layers, num_steps, length, bd,
                                                        num_aux_layers, trained_fraction)
        # token embeddings, plus one step's loss and MLP temporaries in backward
        parts["TTT activations"] += length * (hidden * bd + 2 * vd * 4 * trained_fraction
                                              + 2 * sizes["intermediate"] * bd)
        phases["TTT activations"] = ttt
        if stage == 3:
            parts["draft gathered (ZeRO-3)"] = (trainable + sizes["embedding"]) * bd
            phases["draft gathered (ZeRO-3)"] = ttt
        grads = trainable * bd * (1.0 / world if stage >= 2 else 1.0)
        if stage >= 1:   # DeepSpeed's reduce bucket during backward (two with overlap_comm on GPU)
            bucket = ds_cfg.reduce_bucket_size if device == "cuda" \
                else min(ds_cfg.reduce_bucket_size, trainable)
            parts["reduce bucket"] = bucket * bd * (2 if ds_cfg.overlap_comm and device == "cuda" else 1)
            phases["reduce bucket"] = "draft backward"
        parts["draft grads"] = grads
        phases["draft grads"] = opt
        # the step's fp32 copy of the gradient partition and the AdamW update's temporaries
        parts["fp32 grads + Adam temporaries"] = 0.0 if offload else trainable * 8 * optimizer_shard
        phases["fp32 grads + Adam temporaries"] = opt
    parts["framework overhead"] = overhead_gb * GIB
    label = ds_label or f"zero{stage}" \
        + ("_offload" if ds_cfg.offload_param or ds_cfg.offload_optimizer else "")
    store = bytes_per_token(store_layout, hidden, num_aux_layers, vocab, store_topk) * length \
        if mode == "offline" else 0
    return MemoryBreakdown(mode, label, world_size, parts, phases, store_bytes_per_step=float(store))


def deepspeed_option(name: str, base):
    """The user's deepspeed settings with conf/deepspeed/<name>.yaml applied on top."""
    from omegaconf import OmegaConf

    from data.paths import REPO_ROOT
    from trainer.engine import DeepSpeedConfig

    path = REPO_ROOT / "conf" / "deepspeed" / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"plan: no DeepSpeed option {path}")
    merged = OmegaConf.merge(OmegaConf.structured(DeepSpeedConfig), OmegaConf.structured(base),
                             OmegaConf.load(path))
    return OmegaConf.to_object(merged)


def world_sizes(gpus_per_node: int, max_world_size: int) -> List[int]:
    if gpus_per_node < 1 or max_world_size < gpus_per_node:
        raise ValueError(f"plan: need 1 <= gpus_per_node ({gpus_per_node}) "
                         f"<= max_world_size ({max_world_size})")
    return list(range(gpus_per_node, max_world_size + 1, gpus_per_node))


def smallest_setup(arch: TargetArch, draft_cfg, trainer_cfg, base_ds, gpu_memory_gb: float,
                   gpus_per_node: int, max_world_size: int, mode: str, **kwargs) -> Optional[MemoryBreakdown]:
    """The smallest world size that fits with zero2, else zero3; zero3_offload (parameters and optimizer state
    in host memory, much slower) only when nothing fits on the GPUs up to max_world_size."""
    for names in (DS_OPTIONS[:2], DS_OPTIONS[2:]):
        for world in world_sizes(gpus_per_node, max_world_size):
            for name in names:
                ds = deepspeed_option(name, base_ds)
                plan = plan_memory(arch, draft_cfg, trainer_cfg, ds, world, mode=mode, ds_label=name,
                                   **kwargs)
                if plan.fits(gpu_memory_gb):
                    return plan
    return None


def recommend(arch: TargetArch, draft_cfg, trainer_cfg, base_ds, gpu_memory_gb: float, gpus_per_node: int,
              max_world_size: int, mode: str = "auto", **kwargs) -> Dict[str, object]:
    """Smallest setups for online training, the offline dump and offline training, and which to use."""
    if mode not in ("online", "offline", "auto"):
        raise ValueError(f"plan.mode must be online, offline or auto, got {mode!r}")
    args = (arch, draft_cfg, trainer_cfg, base_ds, gpu_memory_gb, gpus_per_node, max_world_size)
    setups = {name: smallest_setup(*args, mode=name, **kwargs)
              for name in (("online",) if mode == "online" else ("online", "dump", "offline")
                           if mode == "auto" else ("dump", "offline"))}
    online = setups.get("online")
    if online is not None and mode != "offline":
        advice = f"online on {online.world_size} GPUs with {online.deepspeed} " \
            f"({online.total / GIB:.1f} GiB/rank)"
    elif setups.get("offline") is not None and setups.get("dump") is not None:
        dump, offline = setups["dump"], setups["offline"]
        advice = (f"offline: `aerie dump` on {dump.world_size} GPUs with {dump.deepspeed}, then `aerie train "
                  f"trainer.mode=offline` on {offline.world_size} GPUs with {offline.deepspeed}")
    else:
        advice = f"nothing fits in {gpu_memory_gb:g} GB per GPU up to {max_world_size} GPUs"
    return {"setups": setups, "recommendation": advice}


def format_table(plans: List[MemoryBreakdown]) -> str:
    """Components as rows, one column per plan, GiB per rank; a transient row names its phase in brackets."""
    names: List[str] = []
    phase = {}
    for plan in plans:
        names += [n for n in plan.components if n not in names]
        phase.update(plan.phases)
    labels = {n: f"{n} [{phase[n]}]" if n in phase else n for n in names}
    labels["total"] = "peak (resident + largest phase)"
    heads = [f"{p.mode} {p.deepspeed} x{p.world_size}" for p in plans]
    width = max(len(label) for label in labels.values())
    cols = [max(len(h), 8) for h in heads]
    lines = ["GiB per rank".ljust(width) + "  " + "  ".join(h.rjust(c) for h, c in zip(heads, cols))]
    for name in names + ["total"]:
        values = [p.total if name == "total" else p.components.get(name, 0.0) for p in plans]
        lines.append(labels[name].ljust(width) + "  " + "  ".join(f"{v / GIB:.2f}".rjust(c)
                                                                  for v, c in zip(values, cols)))
    return "\n".join(lines)


def run_plan(cfg) -> Dict[str, object]:
    """`aerie plan`: prints the memory table and the recommendation for the composed config's target."""
    from omegaconf import OmegaConf

    from models.registry import DRAFTS
    from models.targets.base import resolve_aux_layer_ids
    from trainer.engine import DeepSpeedConfig
    from trainer.train import TrainerConfig

    def obj(node, cls):
        data = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) \
            else dataclasses.asdict(node)
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})

    plan_cfg = obj(cfg.plan, PlanConfig) if "plan" in cfg else PlanConfig()
    trainer_cfg, draft_cfg = obj(cfg.trainer, TrainerConfig), obj(cfg.draft,
                                                                  DRAFTS.get(cfg.draft.arch).config_class)
    base_ds = obj(cfg.deepspeed, DeepSpeedConfig)
    arch = resolve_arch(str(cfg.target.path), plan_cfg.target_config_json)
    aux = resolve_aux_layer_ids(cfg.target.aux_layer_ids, arch.num_layers)
    gpu_memory_gb = plan_cfg.gpu_memory_gb or cfg.cluster.gpu_memory_gb
    gpus_per_node = plan_cfg.gpus_per_node or cfg.cluster.gpus_per_node
    kwargs = dict(seq_len=plan_cfg.seq_len or trainer_cfg.max_tokens_per_batch, target_dtype=cfg.target.dtype,
                  num_aux_layers=len(aux), logits_chunk_size=cfg.target.logits_chunk_size,
                  store_layout=cfg.store.layout, store_topk=cfg.store.topk, overhead_gb=plan_cfg.overhead_gb)
    result = recommend(arch, draft_cfg, trainer_cfg, base_ds, gpu_memory_gb, gpus_per_node,
                       plan_cfg.max_world_size, plan_cfg.mode, **kwargs)
    found = [p for p in result["setups"].values() if p is not None]
    if plan_cfg.json:
        print(json.dumps({"target": str(cfg.target.path), "gpu_memory_gb": gpu_memory_gb,
                          "arch": dataclasses.asdict(arch), "recommendation": result["recommendation"],
                          "setups": {k: (None if p is None else {"world_size": p.world_size,
                                                                 "deepspeed": p.deepspeed,
                                                                 "total_gib": p.total / GIB, "gib": p.gib()})
                                     for k, p in result["setups"].items()}}, indent=2))
        return result
    active = f", {arch.num_active_params / 1e9:.0f}B active" if arch.num_active_params else ""
    print(f"target {cfg.target.path}: {arch.num_params / 1e9:.1f}B params{active}, {arch.num_layers} layers, "
          f"hidden {arch.hidden_size}, vocab {arch.vocab_size}; {kwargs['seq_len']} tokens per micro-batch, "
          f"{gpu_memory_gb:g} GB x {gpus_per_node} GPUs per node")
    if found:
        print(format_table(found))
    for plan in found:
        if plan.mode == "offline":
            print(f"offline store read per micro-batch: {plan.store_bytes_per_step / 2 ** 20:.1f} MiB "
                  f"({cfg.store.layout} layout)")
    missing = [k for k, p in result["setups"].items() if p is None]
    if missing:
        print(f"does not fit up to {plan_cfg.max_world_size} GPUs: {', '.join(missing)}")
    print(f"recommendation: {result['recommendation']}")
    return result
