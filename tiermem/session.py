"""Generation sessions: the state of a `Model.generate` call, kept so that generation can go on later.

    s = tiermem.GenerationSession()
    out = m.generate(ids, 10, attention_mask=mask, do_sample=True, seed=0, session=s)   # [B, T + 10]
    tiermem.checkpoint.save_async(s.state_dict(), "ckpt/gen").result()
    m.close()
    ...
    m = tiermem.load(store)
    s = tiermem.GenerationSession.from_state_dict(tiermem.checkpoint.load("ckpt/gen"))
    out = m.generate(None, 14, session=s)   # [B, T + 24]: the tokens one uninterrupted call would give

A session holds the tokens so far, the attention mask, the KV cache, which rows have not finished,
the sampling settings and the sampler's torch.Generator. Its state dict keeps only the filled part
of the KV cache (for a quantized cache: its codes, scales and zeros, and the scheme); the cache
grows again when generation continues.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from tiermem.engine.config import ModelConfig
from tiermem.engine.executor import indexed_device
from tiermem.engine.generate import DecodeState, Sampling
from tiermem.engine.kv_cache import KVCache, QuantizedKV
from tiermem.errors import ConfigError
from tiermem.kernels.quant import QuantScheme

FORMAT = "tiermem-generation-session"
VERSION = 1
# ModelConfig fields that are generation defaults, not the model's math: not compared on restore.
_NOT_ARCHITECTURE = ("dtype", "bos_token_id", "eos_token_id", "pad_token_id")


def model_fingerprint(cfg: ModelConfig, weights: str | None = None) -> dict[str, Any]:
    """The architecture fields of `cfg` as plain values, and the weights' id where known (see Model.weights_id):
    what a restored session must match."""
    out: dict[str, Any] = {} if weights is None else {"weights": weights}
    for f in dataclasses.fields(cfg):
        if f.name in _NOT_ARCHITECTURE:
            continue
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            value = dataclasses.asdict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


class GenerationSession:
    """The resumable state of one batched generation; pass it to `Model.generate(..., session=s)`.

    A new session is empty; the first `generate` call fills it from input_ids and the sampling
    arguments, later calls continue from where it stands. `state_dict()` / `from_state_dict()` turn
    it into a nested dict of tensors and plain values for `tiermem.checkpoint` and back.
    """

    def __init__(self) -> None:
        self._state: DecodeState | None = None
        self._sampling: Sampling | None = None
        self._model: dict[str, Any] | None = None  # model_fingerprint of the model it was started on
        self._rng: tuple[str, torch.Tensor] | None = None  # restored generator (device type, state), not yet bound

    # ------------------------------------------------------------------ what it holds

    @property
    def started(self) -> bool:
        """True once a generate call has filled the session (even with 0 new tokens)."""
        return self._state is not None

    def _require_started(self) -> DecodeState:
        if self._state is None:
            raise ConfigError("this GenerationSession is empty: pass it to Model.generate(input_ids, ..., "
                              "session=s) first")
        return self._state

    @property
    def tokens(self) -> torch.Tensor:
        """LongTensor [B, T + n]: the prompt (left-padded) and every token generated so far."""
        return self._require_started().tokens

    @property
    def attention_mask(self) -> torch.Tensor:
        """Bool [B, T + n]: False where tokens holds left padding."""
        return self._require_started().mask

    @property
    def cache(self) -> KVCache:
        """The KV cache; it holds all tokens but the last one chosen (the next step's input)."""
        return self._require_started().cache

    @property
    def unfinished(self) -> torch.Tensor:
        """Bool [B]: rows that have not emitted an EOS token (finished rows emit the pad token)."""
        return self._require_started().unfinished

    @property
    def new_tokens(self) -> int:
        """How many tokens have been generated so far (n)."""
        return self._require_started().new_tokens

    @property
    def prompt_length(self) -> int:
        """T: the prompt's width (tokens[:, prompt_length:] are the generated ones)."""
        state = self._require_started()
        return state.tokens.shape[1] - state.new_tokens

    @property
    def sampling(self) -> Sampling:
        """The sampling settings fixed by the first generate call."""
        self._require_started()
        return self._sampling

    @property
    def generator(self) -> torch.Generator | None:
        """The sampler's RNG (None for greedy); a restored one exists once the session is used again."""
        return self._require_started().generator

    # ------------------------------------------------------------------ state dict

    def state_dict(self) -> dict[str, Any]:
        """A nested dict of tensors, ints, floats, bools, strings and None for tiermem.checkpoint.

        Tensors are shared with the session, not copied (checkpoint.save_async copies what it saves);
        the KV cache is cut to its filled slots.
        """
        state = self._require_started()
        cache, s = state.cache, self._sampling
        if state.generator is not None:
            rng = {"device": state.generator.device.type, "state": state.generator.get_state()}
        elif self._rng is not None:
            rng = {"device": self._rng[0], "state": self._rng[1]}
        else:
            rng = None
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": self._model,
            "tokens": state.tokens,
            "attention_mask": state.mask,
            "unfinished": state.unfinished,
            "new_tokens": state.new_tokens,
            "sampling": {"do_sample": s.do_sample, "temperature": s.temperature, "top_k": s.top_k,
                         "top_p": s.top_p, "eos_token_id": list(s.eos_token_id), "pad_token_id": s.pad_token_id},
            "rng": rng,
            "kv": _kv_state(cache),
        }

    @classmethod
    def from_state_dict(cls, sd: dict[str, Any], device: torch.device | str | None = None) -> GenerationSession:
        """Rebuild a session from `state_dict()` (e.g. as `tiermem.checkpoint.load` returns it).

        device: where to put its tensors (None: leave them where they are); Model.generate moves them
        to the model's device anyway. The KV cache holds exactly the saved slots until generation
        continues and grows it.
        """
        if not isinstance(sd, dict) or sd.get("format") != FORMAT:
            raise ConfigError("not a GenerationSession state dict (no 'format': "
                              f"{FORMAT!r}); pass what GenerationSession.state_dict() returned")
        if sd.get("version") != VERSION:
            raise ConfigError(f"GenerationSession state dict version {sd.get('version')} is not supported "
                              f"(this tiermem reads version {VERSION})")
        try:
            tokens, mask, unfinished = sd["tokens"], sd["attention_mask"], sd["unfinished"]
            if not all(isinstance(t, torch.Tensor) for t in (tokens, mask, unfinished)) or tokens.dim() != 2:
                raise ValueError("tokens, attention_mask and unfinished must be tensors, tokens of shape [B, T]")
            kv, sampling, rng = sd["kv"], sd["sampling"], sd["rng"]
            length, keys, values = int(kv["length"]), _kv_layers(kv, "keys"), _kv_layers(kv, "values")
            new_tokens = int(sd["new_tokens"])
            sampling = Sampling(bool(sampling["do_sample"]), float(sampling["temperature"]),
                                int(sampling["top_k"]), float(sampling["top_p"]),
                                tuple(int(e) for e in sampling["eos_token_id"]), sampling["pad_token_id"])
            sampling.check()
            model = dict(sd["model"])
            rng = None if rng is None else (str(rng["device"]), rng["state"].to("cpu", torch.uint8))
            B, width = tokens.shape
            consistent = (tuple(mask.shape) == (B, width) and tuple(unfinished.shape) == (B,)
                          and 0 <= length < width and 0 <= new_tokens < width and len(keys) == len(values)
                          and all(k.shape[0] == B and k.shape[2] == length and tuple(k.shape) == tuple(v.shape)
                                  for k, v in zip(keys, values, strict=True)))
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, ConfigError) as exc:
            raise ConfigError(f"GenerationSession state dict is incomplete or malformed ({exc!r}); "
                              "pass what GenerationSession.state_dict() returned") from None
        if not consistent:
            raise ConfigError("GenerationSession state dict is inconsistent: tokens, attention_mask, "
                              "unfinished and the KV cache disagree in batch or length")
        mask = mask.to(torch.bool)
        cache = KVCache(keys, values, mask[:, :length].clone(), length)
        session = cls()
        session._state = DecodeState(tokens.to(torch.long), mask, cache, unfinished.to(torch.bool), None,
                                     new_tokens)
        session._sampling, session._model, session._rng = sampling, model, rng
        if device is not None:
            try:
                session._state.to(device)
            except RuntimeError as exc:
                raise ConfigError(f"cannot move the GenerationSession to device {device!r} ({exc})") from exc
        return session

    # ------------------------------------------------------------------ used by Model.generate

    def _start(self, cfg: ModelConfig, state: DecodeState, sampling: Sampling, weights: str | None) -> None:
        self._state, self._sampling, self._model, self._rng = state, sampling, model_fingerprint(cfg, weights), None

    def _check_request(self, requested: dict[str, Any], generator: torch.Generator | None,
                       seed: int | None) -> None:
        """ConfigError if a continuation asks for sampling settings other than the session's."""
        current = self._sampling
        resolved = Sampling.make(**{name: getattr(current, name) if value is None else value
                                    for name, value in requested.items()})
        diffs = [f"{f.name}={getattr(resolved, f.name)!r} (session: {getattr(current, f.name)!r})"
                 for f in dataclasses.fields(Sampling) if getattr(resolved, f.name) != getattr(current, f.name)]
        if diffs:
            raise ConfigError("a GenerationSession keeps the sampling settings of its first generate call; "
                              f"this call asks for {', '.join(diffs)}: leave them out or start a new session")
        if seed is not None or (generator is not None and generator is not self._state.generator):
            raise ConfigError("a GenerationSession carries its own sampler RNG: pass seed= / generator= only "
                              "on the first generate call of the session")

    def _check_model(self, cfg: ModelConfig, weights: str | None) -> None:
        """ConfigError where the session was started on another model (config, or weights where both ids are
        known), or where its KV cache's layers and heads or its token ids do not fit `cfg` (an edited state dict):
        checked before the cache is copied anywhere."""
        state = self._require_started()
        mine = model_fingerprint(cfg, weights if "weights" in self._model else None)
        diffs = [f"{k}: session {self._model.get(k)!r}, model {v!r}" for k, v in mine.items()
                 if self._model.get(k) != v]
        if diffs:
            raise ConfigError("this GenerationSession was started on a model with a different config or weights ("
                              + "; ".join(diffs) + "): continue it on the model it was started on")
        if type(state.cache) is KVCache and not _kv_fits(state.cache, cfg):  # a host or disk cache was made for cfg
            raise ConfigError(f"this GenerationSession's KV cache does not fit the model ({cfg.num_layers} layers "
                              f"of {cfg.num_kv_heads} kv heads x {cfg.head_dim}): the state dict was edited or comes "
                              "from another model")
        if int(state.tokens.min()) < 0 or int(state.tokens.max()) >= cfg.vocab_size:
            raise ConfigError(f"this GenerationSession holds token ids outside the model's vocabulary "
                              f"[0, {cfg.vocab_size}): the state dict was edited or comes from another model")

    def _bind(self, dtype: torch.dtype, device: torch.device) -> DecodeState:
        """Check the session's KV dtype and RNG fit this model (after _check_model) and move it onto `device`;
        returns its state."""
        state = self._require_started()
        device = indexed_device(device)
        kv_dtype = state.cache.dtype or dtype
        if kv_dtype != dtype:
            raise ConfigError(f"this GenerationSession's KV cache is {kv_dtype}, the model computes in {dtype}: "
                              f"load the model with dtype={kv_dtype}")
        if state.tokens.device != device:
            state.to(device)
        if self._rng is not None:
            rng_device, rng_state = self._rng
            if rng_device != device.type:
                raise ConfigError(f"this GenerationSession's sampler RNG is a {rng_device} generator and the "
                                  f"model runs on {device.type}: the random stream cannot continue there; "
                                  f"load the model with device={rng_device!r}")
            generator = torch.Generator(device=device)
            try:
                generator.set_state(rng_state)
            except RuntimeError as exc:
                raise ConfigError(f"this GenerationSession's sampler RNG state is not one torch can take ({exc}): "
                                  "the state dict was edited or damaged") from exc
            state.generator, self._rng = generator, None
        elif state.generator is not None and state.generator.device != device:
            if state.generator.device.type != device.type:
                raise ConfigError(f"this GenerationSession's sampler RNG is a {state.generator.device.type} "
                                  f"generator and the model runs on {device.type}: continue it on "
                                  f"{state.generator.device.type}")
            generator = torch.Generator(device=device)
            generator.set_state(state.generator.get_state())
            state.generator = generator
        return state


def _kv_fits(cache: KVCache, cfg: ModelConfig) -> bool:
    """Whether the cache has cfg's layers, each K and V [B, Hkv, S, Dh] with cfg's Hkv and Dh."""
    shapes = [tuple(t.shape[1::2]) for t in (*cache.keys, *cache.values)]  # (Hkv, Dh) of each
    return len(cache.keys) == cfg.num_layers and all(shape == (cfg.num_kv_heads, cfg.head_dim) for shape in shapes)


def _kv_state(cache: KVCache) -> dict[str, Any]:
    """The filled slots of the cache: dense K/V tensors, or codes/scale/zero per layer plus the scheme."""
    cache.flush()
    L = cache.length
    scheme = cache.kv_quant
    if scheme is None:
        return {"length": L, "quant": None, "keys": [k[:, :, :L] for k in cache.keys],
                "values": [v[:, :, :L] for v in cache.values]}

    def part(t: QuantizedKV) -> dict[str, torch.Tensor]:
        return {"codes": t.codes[:, :, :L], "scale": t.scale[:, :, :L], "zero": t.zero[:, :, :L]}

    return {"length": L,
            "quant": {"bits": scheme.bits, "group_size": scheme.group_size,
                      "dtype": str(cache.dtype).removeprefix("torch.")},
            "keys": [part(k) for k in cache.keys], "values": [part(v) for v in cache.values]}


def _kv_layers(kv: dict[str, Any], which: str) -> list[torch.Tensor | QuantizedKV]:
    """The saved K or V of every layer, as the cache holds them (a state dict without "quant" is dense)."""
    quant = kv.get("quant")
    if quant is None:
        return list(kv[which])
    scheme = QuantScheme(bits=int(quant["bits"]), group_size=int(quant["group_size"]))
    dtype = getattr(torch, str(quant["dtype"]))
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown KV dtype {quant['dtype']!r}")
    return [QuantizedKV(p["codes"].to(torch.uint8), p["scale"].to(torch.float16), p["zero"].to(torch.float16),
                        scheme, dtype) for p in kv[which]]
