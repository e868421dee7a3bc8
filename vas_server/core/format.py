"""The value-model checkpoint format (docs/VAS_RULE.md §3): a directory with `vas.json` and safetensors.

Layout:
    vas.json                 format version, trunk, heads, tokenizer identity, optional default top-K
    heads.safetensors        head tensors, keys "<head>.<tensor>" (see vas_server.core.heads)
    lora/                    optional PEFT adapter for a `base_prefix` trunk
    trunk/                   the Hugging Face causal-LM directory of a `standalone` trunk

Only safetensors are ever read: no pickle.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
SPEC_FILE = "vas.json"
HEADS_FILE = "heads.safetensors"
LORA_DIR = "lora"
STANDALONE_DIR = "trunk"
HEAD_KINDS = ("state", "token")
TRUNK_TYPES = ("base_prefix", "standalone")
# VAS candidates per step (docs/VAS_RULE.md §1): the spec's default, and the range a request or a
# checkpoint may set.
DEFAULT_TOP_K = 20
TOP_K_RANGE = (1, 256)


def is_top_k(k) -> bool:
    """An integer (not a bool) in TOP_K_RANGE."""
    return isinstance(k, int) and not isinstance(k, bool) and TOP_K_RANGE[0] <= k <= TOP_K_RANGE[1]


class ValueModelFormatError(ValueError):
    """A value-model directory that does not follow the format."""


class TokenizerMismatchError(ValueError):
    """A value model whose tokenizer differs from the base model's."""


@dataclass
class HeadSpec:
    name: str
    kind: str  # "state" | "token"
    description: str = ""
    reward_mean: float = 0.0
    reward_std: float = 1.0
    num_training_samples: int = 0


@dataclass
class TrunkSpec:
    type: str  # "base_prefix" | "standalone"
    # base_prefix: how many of the base model's layers; standalone: None means all of them.
    num_layers: int | None = None
    lora: bool = False  # base_prefix only: a PEFT adapter lives in lora/
    # base_prefix only: the base it was trained on (HF architecture, layer count, hidden size), so
    # that a server refuses another base. None: not recorded (checkpoints before format 1.1).
    base_architecture: str | None = None
    base_num_layers: int | None = None
    base_hidden_size: int | None = None


@dataclass
class TokenizerIdentity:
    vocab_size: int
    vocab_hash: str


@dataclass
class ValueModelSpec:
    trunk: TrunkSpec
    heads: list[HeadSpec]
    tokenizer: TokenizerIdentity
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)
    # The top-K this model steers best with, chosen by evaluation (None: the spec's DEFAULT_TOP_K).
    # A request's vas_top_k and the server's --default-top-k win over it.
    default_top_k: int | None = None

    def head(self, name: str) -> HeadSpec:
        for h in self.heads:
            if h.name == name:
                return h
        raise KeyError(name)


def tokenizer_identity(tokenizer) -> TokenizerIdentity:
    """Vocabulary size and a hash of the (token, id) pairs: equal iff the tokens mean the same."""
    vocab = tokenizer.get_vocab()
    digest = hashlib.sha256(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode()).hexdigest()
    return TokenizerIdentity(vocab_size=len(vocab), vocab_hash=digest)


def check_tokenizer(spec: ValueModelSpec, base_identity: TokenizerIdentity, *, value_model: str,
                    base_model: str) -> None:
    """Raise TokenizerMismatchError naming both tokenizers unless they share the vocabulary."""
    ours = spec.tokenizer
    if ours.vocab_hash != base_identity.vocab_hash or ours.vocab_size != base_identity.vocab_size:
        raise TokenizerMismatchError(
            f"value model {value_model!r} was trained with a different tokenizer than the base "
            f"model {base_model!r}: value model vocab_size={ours.vocab_size} "
            f"hash={ours.vocab_hash[:12]}, base vocab_size={base_identity.vocab_size} "
            f"hash={base_identity.vocab_hash[:12]}. Value models must share the base's vocabulary."
        )


def _validate(spec: ValueModelSpec, where: str) -> None:
    if spec.format_version != FORMAT_VERSION:
        raise ValueModelFormatError(f"{where}: unsupported format_version {spec.format_version}")
    if spec.trunk.type not in TRUNK_TYPES:
        raise ValueModelFormatError(f"{where}: trunk type must be one of {TRUNK_TYPES}, got {spec.trunk.type!r}")
    if spec.trunk.type == "base_prefix" and not (spec.trunk.num_layers and spec.trunk.num_layers > 0):
        raise ValueModelFormatError(f"{where}: a base_prefix trunk needs num_layers >= 1")
    if spec.trunk.lora and spec.trunk.type != "base_prefix":
        raise ValueModelFormatError(f"{where}: only base_prefix trunks carry a LoRA adapter")
    if not spec.heads:
        raise ValueModelFormatError(f"{where}: no heads")
    names = [h.name for h in spec.heads]
    if len(set(names)) != len(names):
        raise ValueModelFormatError(f"{where}: duplicate head names {names}")
    for h in spec.heads:
        if h.kind not in HEAD_KINDS:
            raise ValueModelFormatError(f"{where}: head {h.name!r} kind must be one of {HEAD_KINDS}")
        if not h.reward_std > 0:
            raise ValueModelFormatError(f"{where}: head {h.name!r} reward_std must be > 0")
    if spec.default_top_k is not None and not is_top_k(spec.default_top_k):
        raise ValueModelFormatError(f"{where}: default_top_k must be an integer in {TOP_K_RANGE[0]}..{TOP_K_RANGE[1]}, "
                                    f"got {spec.default_top_k!r}")


def save_spec(path: Path | str, spec: ValueModelSpec) -> None:
    path = Path(path)
    _validate(spec, str(path))
    path.mkdir(parents=True, exist_ok=True)
    (path / SPEC_FILE).write_text(json.dumps(asdict(spec), indent=2) + "\n")


def load_spec(path: Path | str) -> ValueModelSpec:
    path = Path(path)
    try:
        raw = json.loads((path / SPEC_FILE).read_text())
    except FileNotFoundError:
        raise ValueModelFormatError(f"{path} is not a value model: {SPEC_FILE} is missing") from None
    except ValueError as e:
        raise ValueModelFormatError(f"{path / SPEC_FILE}: invalid JSON ({e})") from None
    try:
        spec = ValueModelSpec(
            trunk=TrunkSpec(**raw["trunk"]),
            heads=[HeadSpec(**h) for h in raw["heads"]],
            tokenizer=TokenizerIdentity(**raw["tokenizer"]),
            format_version=raw.get("format_version", 0),
            extra=raw.get("extra", {}),
            default_top_k=raw.get("default_top_k"),
        )
    except (KeyError, TypeError) as e:
        raise ValueModelFormatError(f"{path / SPEC_FILE}: malformed ({e})") from None
    _validate(spec, str(path))
    return spec


def save_head_tensors(path: Path | str, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(Path(path) / HEADS_FILE))


def load_head_tensors(path: Path | str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(path) / HEADS_FILE))
