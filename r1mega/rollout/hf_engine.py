"""The ``hf`` engine: batched KV-cache sampling on the transformers model class, for CPU machines.

    engine = HFEngine(policy.desc.config, tokenizer=tokenizer_dir)     # no weights yet
    engine.refit(policy.hf_weight_buckets(64 << 20))                   # straight from the stream
    completions = engine.generate(prompts, SamplingParams(n=8, max_new_tokens=256, seed=0))

It builds the transformers model of the policy's architecture (DeepSeek-V3, Qwen3-MoE, Qwen2,
Llama-3) from the Hugging Face config without initialising weights; every weight comes from the
stream (no disk round trip). One generate call:

1. prefill: the prompts (not the prompts x n) left-padded into one batch, one forward that
   keeps only the last position's logits; the cache is then repeated n times;
2. decode: one forward per step over the live rows, the cache written in place
   (:mod:`r1mega.rollout.kv_cache`), sampling as :func:`r1mega.rollout.processed_logits`
   defines it (exponential race: argmax(log p - log E), E ~ Exp(1), exact categorical sampling),
   the processed log-prob of each sampled token kept;
3. early exit: a row that stops (a stop token, a stop string, the token budget) is removed
   from the batch once enough rows have stopped, so the step cost follows the live rows.

Prompts are processed in chunks of at most ``max_batch_rows // n`` prompts. With
``SamplingParams.seed`` every completion row draws from its own generator seeded by (seed,
prompt index, sample index), so it does not depend on the rest of the batch, the chunking or the
compaction (up to floating-point rounding of batched matrix products).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from r1mega.models.hf_config import describe_hf_config
from r1mega.models.hf_mapping import expected_hf_tensors
from r1mega.rollout import hf_kernels
from r1mega.rollout.engine import Engine
from r1mega.rollout.hf_weights import weight_views
from r1mega.rollout.kv_cache import buffer_cache, repeat_rows, select_rows
from r1mega.rollout.routes import RouteRecorder
from r1mega.rollout.sampling import Completion, SamplingParams, check_prompts, processed_logits

_MASK64 = (1 << 64) - 1


def row_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """A 63-bit generator seed for one completion row (splitmix64 of the three numbers)."""
    x = (seed * 0x9E3779B97F4A7C15 + prompt_index * 0xBF58476D1CE4E5B9 + sample_index * 0x94D049BB133111EB) & _MASK64
    for _ in range(2):
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        x ^= x >> 31
    return x >> 1


def _hf_config(model_config: Any):
    import transformers

    if isinstance(model_config, transformers.PretrainedConfig):
        return model_config
    if isinstance(model_config, (str, Path)):
        return transformers.AutoConfig.from_pretrained(str(model_config))
    if isinstance(model_config, Mapping):
        data = dict(model_config)
        model_type = data.pop("model_type", None)
        if model_type is None:
            raise ValueError("hf engine: the model config has no 'model_type'")
        for key in ("architectures", "transformers_version", "_name_or_path"):
            data.pop(key, None)
        return transformers.AutoConfig.for_model(model_type, **data)
    raise TypeError(f"hf engine: model_config must be a config dict, a directory or a PretrainedConfig, "
                    f"got {type(model_config).__name__}")


def _eos_ids(config, config_dir: Optional[Path]) -> tuple[int, ...]:
    ids = config.eos_token_id
    if config_dir is not None and (config_dir / "generation_config.json").is_file():
        import json

        gen = json.loads((config_dir / "generation_config.json").read_text())
        ids = gen.get("eos_token_id", ids)
    if ids is None:
        return ()
    return tuple(ids) if isinstance(ids, (list, tuple)) else (int(ids),)


def _no_init():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


class HFEngine(Engine):
    """Rollouts with a transformers model; see the module docstring."""

    name = "hf"

    def __init__(self, model_config: Any, *, tokenizer: Any = None, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", seed: int = 0, max_batch_rows: int = 256,
                 experts_implementation: Optional[str] = "auto", attn_implementation: str = "auto"):
        """`model_config`: the policy's HF config (``policy.desc.config``), a model directory or a
        PretrainedConfig. `tokenizer`: a directory or tokenizer object, needed only for stop
        strings. `seed`: the generator of unseeded calls. `attn_implementation` and
        `experts_implementation`: transformers' names; ``auto`` takes the decode kernels of
        :mod:`r1mega.rollout.hf_kernels` (sdpa and grouped_mm on transformers 4.x).
        """
        import transformers

        if not isinstance(max_batch_rows, int) or max_batch_rows < 1:
            raise ValueError(f"hf engine: max_batch_rows must be a positive int, got {max_batch_rows!r}")
        config = _hf_config(model_config)
        self.desc = describe_hf_config(config.to_dict())
        super().__init__(expected_hf_tensors(self.desc))
        config_dir = Path(model_config) if isinstance(model_config, (str, Path)) else None
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_batch_rows = max_batch_rows
        own = hf_kernels.register()
        if attn_implementation == "auto":
            attn_implementation = hf_kernels.ATTENTION_NAME if own else "sdpa"
        if experts_implementation == "auto":
            experts_implementation = hf_kernels.EXPERTS_NAME if own else None
        kwargs = {"attn_implementation": attn_implementation}
        if experts_implementation is not None and self.desc.is_moe:
            kwargs["experts_implementation"] = experts_implementation
        with _no_init():
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
        if self.desc.tie_embeddings:  # from_config under no_init_weights leaves lm_head untied
            model.tie_weights()
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.config = self.model.config
        self.vocab_size = self.desc.vocab_size
        self.max_positions = self.desc.max_position_embeddings
        self.eos_token_ids = _eos_ids(config, config_dir)
        self.tokenizer = self._load_tokenizer(tokenizer)
        self._cache_kwarg = "cache" if "cache" in inspect.signature(self.model.forward).parameters \
            else "past_key_values"
        base = getattr(self.model, "model", None)
        self._lean = (attn_implementation == hf_kernels.ATTENTION_NAME and hasattr(self.model, "lm_head")
                      and all(hasattr(base, a) for a in ("embed_tokens", "rotary_emb", "layers", "norm")))
        self._views = weight_views(self.model, self.expected_weights)
        self._shapes = {name: (p.shape, p.dtype) for name, p in self.model.named_parameters()}
        self._offloaded: dict[str, torch.Tensor] = {}
        self._rng = torch.Generator(device="cpu").manual_seed(seed)
        self.routes = RouteRecorder(self.model) if self.desc.is_moe else None

    @staticmethod
    def _load_tokenizer(tokenizer):
        if tokenizer is None or not isinstance(tokenizer, (str, Path)):
            return tokenizer
        import transformers

        return transformers.AutoTokenizer.from_pretrained(str(tokenizer))

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """HF indices of the MoE layers, in the order of a completion's routes."""
        return self.routes.layers if self.routes is not None else ()

    # ---- weights ----------------------------------------------------------------------------
    @torch.no_grad()
    def _load_weights(self, bucket: Sequence[tuple[str, torch.Tensor]]) -> int:
        total = 0
        for name, tensor in bucket:
            view = self._views[name]
            if tuple(tensor.shape) != tuple(view.shape):
                raise ValueError(f"hf engine: {name!r} has shape {tuple(tensor.shape)}, the model expects "
                                 f"{tuple(view.shape)}")
            view.copy_(tensor)
            total += tensor.numel() * tensor.element_size()
        return total

    def _held_weights(self) -> Iterable[tuple[str, torch.Tensor]]:
        return iter(self._views.items())

    def _sleep(self, level: int) -> None:
        params = dict(self.model.named_parameters())
        if level == 2:  # drop: free every parameter's storage; a refit refills them after the wake
            for p in params.values():
                p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        elif self.device.type != "cpu":  # offload to host memory
            for name, p in params.items():
                self._offloaded[name] = p.data.to("cpu")
                p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        # level 1 on CPU: the weights already live in host memory; the KV cache is per call

    def _wake_weights(self) -> None:
        for name, p in self.model.named_parameters():
            if name in self._offloaded:
                p.data = self._offloaded.pop(name).to(self.device)
            elif p.numel() == 0 and self._shapes[name][0].numel() != 0:
                p.data = torch.empty(self._shapes[name][0], dtype=p.dtype, device=self.device)
        self._views = weight_views(self.model, self.expected_weights)

    def _close(self) -> None:
        if self.routes is not None:
            self.routes.remove()
        self.model = None
        self._views = {}

    # ---- generation -------------------------------------------------------------------------
    def _stop_ids(self, params: SamplingParams) -> torch.Tensor:
        ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            ids.update(self.eos_token_ids)
        return torch.tensor(sorted(ids), dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def _generate(self, prompt_token_ids: Sequence[Sequence[int]], params: SamplingParams,
                  first_prompt_index: int = 0) -> list[Completion]:
        if params.stop and self.tokenizer is None:
            raise ValueError("hf engine: stop strings need a tokenizer (HFEngine(..., tokenizer=DIR))")
        if params.return_routes and self.routes is None:
            raise ValueError(f"hf engine: return_routes needs an MoE model; {self.desc.arch} has no experts")
        prompts = check_prompts(prompt_token_ids, self.vocab_size, self.max_positions, params.max_new_tokens)
        start = time.perf_counter()
        per_chunk = max(1, self.max_batch_rows // params.n)
        out: list[Completion] = []
        for first in range(0, len(prompts), per_chunk):
            out += self._generate_chunk(prompts[first:first + per_chunk], first_prompt_index + first, params, start)
        return out

    def _forward(self, ids, attention_mask, positions, cache, keep_last: bool):
        if ids.shape[1] == 1 and self._lean:
            return self._decode_step(ids, attention_mask, positions, cache)
        kwargs = {self._cache_kwarg: cache}
        if keep_last:
            kwargs["logits_to_keep"] = 1
        return self.model(input_ids=ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                          **kwargs).logits[:, -1]

    def _decode_step(self, ids, attention_mask, positions, cache):
        # One token per row through the model's own modules, without the model-level wrappers
        # (mask construction, output capturing, argument merging: about a tenth of a tiny
        # model's decode step). The decode attention kernel takes the [B, 1, 1, L] padding mask.
        base = self.model.model
        hidden = base.embed_tokens(ids)
        rope = base.rotary_emb(hidden, position_ids=positions)
        mask = attention_mask.bool()[:, None, None, :]
        for layer in base.layers:
            hidden = layer(hidden, attention_mask=mask, position_ids=positions, use_cache=True,
                           position_embeddings=rope, **{self._cache_kwarg: cache})
        return self.model.lm_head(base.norm(hidden)[:, -1])

    def _generate_chunk(self, prompts: list[list[int]], first: int, params: SamplingParams,
                        start: float) -> list[Completion]:
        dev, n, budget = self.device, params.n, params.max_new_tokens
        n_prompts = len(prompts)
        rows = n_prompts * n
        lengths = torch.tensor([len(p) for p in prompts], device=dev)
        width = int(lengths.max())
        record = params.return_routes
        if self.routes is not None:
            self.routes.enabled = record

        # 1. prefill the prompts once, left-padded
        ids = torch.zeros(n_prompts, width, dtype=torch.long, device=dev)
        mask = torch.zeros(n_prompts, width + budget, dtype=torch.long, device=dev)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p, device=dev)
            mask[i, width - len(p): width] = 1
        positions = (mask[:, :width].cumsum(-1) - 1).clamp(min=0)
        cache = buffer_cache(self.config, width + min(budget, 256))
        logits = self._forward(ids, mask[:, :width], positions, cache, keep_last=True)
        prompt_routes = self.routes.take(n_prompts, width) if record else None

        repeat_rows(cache, n)
        logits = logits.repeat_interleave(n, dim=0)
        mask = mask.repeat_interleave(n, dim=0)
        next_pos = lengths.repeat_interleave(n).unsqueeze(1)

        # per completion row r = i * n + j
        tokens = torch.zeros(rows, budget, dtype=torch.long, device=dev)
        logps = torch.zeros(rows, budget, dtype=torch.float32, device=dev) if params.return_logprobs else None
        gen_routes = (torch.zeros(rows, budget, len(self.moe_layers), self.routes.top_k, dtype=torch.int16,
                                  device=dev) if record else None)
        out_len = torch.zeros(rows, dtype=torch.long)
        reasons: list[Optional[str]] = [None] * rows
        stop_reasons: list[Any] = [None] * rows
        finish_s = [0.0] * rows
        live = torch.arange(rows, device=dev)  # completion row of each batch row
        done_in_batch = 0
        gens = block = None
        if params.seed is not None and not params.greedy:
            gens = [torch.Generator(device=dev).manual_seed(row_seed(params.seed, first + r // n, r % n))
                    for r in range(rows)]
            # each row draws its noise for `per_draw` steps at once (one generator call per row per draw)
            per_draw = max(1, min(32, (1 << 22) // (rows * self.vocab_size)))
            block = torch.empty(rows, per_draw, self.vocab_size, device=dev)
        stop_ids = self._stop_ids(params)
        stop_window = max((len(s) for s in params.stop), default=0) + 1
        finished = torch.zeros(rows, dtype=torch.bool)
        first_token_s = 0.0

        for step in range(budget):
            # 2. sample every batch row (finished ones too, until compacted; their tokens are ignored)
            x = processed_logits(logits, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)
            if params.greedy:
                tok = x.argmax(dim=-1)
            else:
                if gens is None:
                    noise = torch.empty_like(x).exponential_(generator=self._rng)
                else:
                    if step % per_draw == 0:
                        for r in live.tolist():
                            block[r].exponential_(generator=gens[r])
                    noise = block[live, step % per_draw]
                # E == 0 would turn a -inf logit into nan; a tiny E keeps the race exact otherwise
                tok = (x - noise.clamp_(min=torch.finfo(noise.dtype).tiny).log()).argmax(dim=-1)
            tokens[live, step] = tok
            if logps is not None:
                logps[live, step] = torch.log_softmax(x, dim=-1).gather(1, tok[:, None]).squeeze(1)
            if step == 0:
                first_token_s = time.perf_counter() - start

            # which rows end here
            live_cpu = live.cpu()
            fresh = ~finished[live_cpu]
            stop_hit = torch.isin(tok, stop_ids).cpu() & fresh if stop_ids.numel() else torch.zeros_like(fresh)
            now = time.perf_counter() - start
            ended = []
            for b in fresh.nonzero().flatten().tolist():
                r = int(live_cpu[b])
                reason, why = None, None
                if stop_hit[b]:
                    t = int(tok[b])
                    reason, why = "stop", (None if t in self.eos_token_ids and t not in params.stop_token_ids else t)
                elif params.stop:
                    tail = self.tokenizer.decode(tokens[r, max(0, step + 1 - stop_window): step + 1].tolist())
                    hit = next((s for s in params.stop if s in tail), None)
                    if hit is not None:
                        reason, why = "stop", hit
                if reason is None and step + 1 == budget:
                    reason = "length"
                if reason is None and self._abort.is_set():
                    reason = "abort"
                if reason is not None:
                    reasons[r], stop_reasons[r], finish_s[r] = reason, why, now
                    out_len[r] = step + 1
                    ended.append(r)
            if ended:
                finished[ended] = True
                done_in_batch += len(ended)
            if bool(finished.all()):
                break

            # 3. drop finished rows once enough have piled up
            if done_in_batch and done_in_batch >= max(1, len(live) // 8):
                keep = (~finished[live_cpu]).nonzero().flatten().to(dev)
                select_rows(cache, keep)
                live, tok, mask, next_pos = live[keep], tok[keep], mask[keep], next_pos[keep]
                done_in_batch = 0

            length = width + step + 1
            mask[:, length - 1] = 1
            logits = self._forward(tok[:, None], mask[:, :length], next_pos, cache, keep_last=False)
            next_pos = next_pos + 1
            if record:
                gen_routes[live, step] = self.routes.take(len(live), 1)[:, 0]

        out = []
        for r in range(rows):
            i, j, size = r // n, r % n, int(out_len[r])
            routes = None
            if record:
                p_len = int(lengths[i])
                tail = torch.arange(self.routes.top_k, dtype=torch.int16).expand(1, len(self.moe_layers), -1)
                routes = torch.cat([prompt_routes[i, width - p_len:], gen_routes[r, :size - 1], tail]).cpu()
            out.append(Completion(
                prompt_index=first + i, sample_index=j, token_ids=tokens[r, :size].cpu(),
                finish_reason=reasons[r], stop_reason=stop_reasons[r],
                logprobs=logps[r, :size].cpu() if logps is not None else None, routes=routes,
                first_token_s=first_token_s, finish_s=finish_s[r]))
        if self.routes is not None:
            self.routes.enabled = False
        return out
