"""``ModelConfig``: one typed, frozen description of every model of the family (MUSE, its ablations, baselines).

The family has two switches and a handful of sizes:

- ``gsu`` picks which K behaviors of the lifelong history reach the ESU:
  ``"none"`` (DIN: no lifelong sequence, recent behaviors only), ``"category"`` (SIM-hard: behaviors of the
  target's category), ``"multimodal"`` (MUSE: cosine top-K in the frozen multimodal table) -- these three run
  in the input pipeline (``model.gsu.GsuStage``) -- and ``"id"`` (SIM-soft: top-K by the inner product of ID
  embeddings) and ``"attention"`` (TWIN: top-K by the ESU's own target-attention score), which run inside the
  model on the whole history because they need the trained ID embeddings.
- ``esu`` picks how the K behaviors are summarised: ``"ta"`` (target attention over ID embeddings),
  ``"simtier"`` (histogram of multimodal cosines over tiers of [-1, 1]), ``"sata"`` (similarity-aware target
  attention, ``a = g1*a_id + g2*R + g3*a_id*R``) or a ``+`` of an attention and SimTier. With ``gsu == "none"``
  (no lifelong behaviors) only the part that needs none stays: the SimTier over the recent behaviors' cosines,
  when ``esu`` has SimTier and ``simtier_recent`` is set (the released code's DIN); otherwise there is no ESU.
- ``pq_m`` (multimodal GSU only) swaps the exact cosine top-K for SEMINAR's approximate one: product-quantized
  codes of the table (``muse pq``, ``model.gsu.pq``), per-target lookup tables summed over the history's codes,
  and with ``pq_candidates`` the best K' by estimate re-scored exactly (``model.gsu.pq_topk``); presets
  ``muse_pq`` and ``paper_muse_pq``.

Two families of presets:

- ID-only baselines (``din``, ``sim_hard``, ``sim_soft``, ``twin``) and MUSE with its ablations: the baselines
  summarise their K behaviors by target attention over ID embeddings only (no multimodal signal in the ESU).
- The paper protocol (``paper_*``), the released code's definitions (github.com/alimama-tech/MUSE,
  ``model/muse.py``): every method is the same model, SA-TA with R (learned temperature from 0.1, SiLU
  query/key/value projections) + SimTier over the K behaviors + SimTier over the recent 50, tower 256-128-64,
  ID tables initialised at std 1e-3; only the GSU changes. The released DIN keeps only the recent SimTier
  (its lifelong features are zeroed). The released code has no TWIN; ``paper_twin`` is the same model with
  TWIN's GSU (top-K by the attention's ID score). MISS (paper table) does not fit: its GSU is a learned
  multimodal tree index, which neither the released code nor this family has.
"""

from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Optional

GSU_KINDS = ("none", "category", "multimodal", "id", "attention")
PIPELINE_GSU = ("category", "multimodal")
IN_MODEL_GSU = ("id", "attention")
ESU_KINDS = ("ta", "simtier", "ta+simtier", "sata", "sata+simtier")
ACTIVATIONS = ("dice", "prelu")


def reject_unknown_fields(cls: type, data: dict[str, Any]) -> None:
    """ValueError naming the keys of ``data`` that are not fields of the dataclass ``cls`` (a saved config from
    another version, or a typo)."""
    unknown = sorted(set(data) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")


# What every paper-protocol preset shares (the released MUSE_DIN model): SA-TA with R over the K behaviors,
# SimTier (tier width 0.1, one value per tier) over the K and the recent 50 cosines, the 256-128-64 Dice tower.
_PAPER: dict[str, Any] = {
    "esu": "sata+simtier", "simtier_recent": True, "tier_width": 0.1, "tier_dim": 1, "k": 50, "recent_len": 50,
    "attention_dim": 32, "mlp_dims": (256, 128, 64), "activation": "dice", "r_temperature": 0.1,
    "attention_projections": True, "embedding_init_std": 1e-3,
}


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of one model of the family. Validated on construction (``ValueError`` naming the field).

    name:            label for logs and run directories.
    gsu:             one of ``GSU_KINDS`` (see module docstring).
    esu:             one of ``ESU_KINDS``.
    id_dim:          embedding width of every ID table; a behavior is item ++ category, width ``2 * id_dim``.
    k:               number of behaviors the GSU selects.
    recent_len:      number of most recent behaviors seen by the DIN attention (S).
    tier_width:      SimTier tier width; ``2 / tier_width`` tiers must tile [-1, 1] exactly.
    tier_dim:        width of the learned per-tier vector of SimTier.
    simtier_recent:  also histogram the recent behaviors' cosines (as the released MUSE code does).
    attention_dim:   projection width of the target attention (query/key) used by TA, SA-TA and TWIN.
    din_dims:        hidden widths of the DIN attention unit's MLP over [q, k, q-k, q*k].
    mlp_dims:        hidden widths of the prediction tower.
    activation:      ``"dice"`` or ``"prelu"``, used in the tower and the DIN attention unit.
    r_temperature:   SA-TA divides R by a learned temperature initialised to this (released code: 0.1, so R
                     enters ~10x stronger at initialisation); None: R enters as is.
    attention_projections: TA/SA-TA project query, key and value, each ``SiLU(W x + b)`` (the released SA-TA),
                     scores ``q'.k'`` unscaled and pools the projected values; False: ``a_id = (W_q q + b_q).(W_k e)
                     / sqrt(attention_dim)`` pooling the behaviors themselves.
    pq_m:            None: the exact multimodal GSU; M: the approximate one on M-subspace PQ codes (gsu "multimodal").
    pq_candidates:   with ``pq_m``: K' >= k behaviors by estimate re-scored exactly (0: estimates as the scores).
    embedding_init_std: ID tables start uniform with this standard deviation (released: truncated normal, std
                     1e-3; TorchRec's sharded kernels initialise uniformly); None: TorchRec's default,
                     uniform in +-sqrt(1 / rows).
    """

    name: str = "muse"
    gsu: str = "multimodal"
    esu: str = "sata+simtier"
    id_dim: int = 16
    k: int = 50
    recent_len: int = 50
    tier_width: float = 0.1
    tier_dim: int = 8
    simtier_recent: bool = True
    attention_dim: int = 32
    din_dims: tuple[int, ...] = (80, 40)
    mlp_dims: tuple[int, ...] = (200, 80)
    activation: str = "dice"
    r_temperature: Optional[float] = None
    attention_projections: bool = False
    embedding_init_std: Optional[float] = None
    pq_m: Optional[int] = None
    pq_candidates: int = 0

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "din": {"gsu": "none", "esu": "ta"},
        "sim_hard": {"gsu": "category", "esu": "ta"},
        "sim_soft": {"gsu": "id", "esu": "ta"},
        "twin": {"gsu": "attention", "esu": "ta"},
        "muse": {"gsu": "multimodal", "esu": "sata+simtier"},
        # Ablations of the paper: ESU variants on the multimodal GSU, and MUSE's ESU on an ID-based GSU.
        "muse_ta": {"gsu": "multimodal", "esu": "ta"},
        "muse_simtier": {"gsu": "multimodal", "esu": "simtier"},
        "muse_ta_simtier": {"gsu": "multimodal", "esu": "ta+simtier"},
        "muse_sata": {"gsu": "multimodal", "esu": "sata"},
        "muse_sata_simtier": {"gsu": "multimodal", "esu": "sata+simtier"},
        "muse_gsu_id": {"gsu": "id", "esu": "sata+simtier"},
        # The paper protocol: the released code's model for every method, only the GSU changes.
        "paper_din": {**_PAPER, "gsu": "none"},
        "paper_sim_hard": {**_PAPER, "gsu": "category"},
        "paper_sim_soft": {**_PAPER, "gsu": "id"},
        "paper_twin": {**_PAPER, "gsu": "attention"},
        "paper_muse": {**_PAPER, "gsu": "multimodal"},
        # MUSE on SEMINAR's approximate GSU: 16-byte PQ codes, the best 200 by estimate re-scored exactly.
        "muse_pq": {"gsu": "multimodal", "esu": "sata+simtier", "pq_m": 16, "pq_candidates": 200},
        "paper_muse_pq": {**_PAPER, "gsu": "multimodal", "pq_m": 16, "pq_candidates": 200},
    }
    PAPER_PRESETS: ClassVar[tuple[str, ...]] = ("paper_din", "paper_sim_hard", "paper_sim_soft", "paper_twin", "paper_muse")
    # The approximate-GSU variants and the exact preset each is compared against (``muse compare --pq``).
    PQ_PRESETS: ClassVar[dict[str, str]] = {"muse_pq": "muse", "paper_muse_pq": "paper_muse"}

    def __post_init__(self) -> None:
        if self.gsu not in GSU_KINDS:
            raise ValueError(f"gsu must be one of {GSU_KINDS}, got {self.gsu!r}")
        if self.esu not in ESU_KINDS:
            raise ValueError(f"esu must be one of {ESU_KINDS}, got {self.esu!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        for field in ("id_dim", "k", "recent_len", "tier_dim", "attention_dim"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field} must be a positive int, got {value!r}")
        for field in ("din_dims", "mlp_dims"):
            dims = getattr(self, field)
            if not isinstance(dims, tuple) or not dims or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims):
                raise ValueError(f"{field} must be a non-empty tuple of positive ints, got {dims!r}")
        if self.gsu == "attention" and self.attention_kind is None:
            raise ValueError(f"esu must contain an attention ('ta' or 'sata') when gsu is 'attention' (TWIN selects by it), got {self.esu!r}")
        for field in ("simtier_recent", "attention_projections"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"{field} must be a bool, got {getattr(self, field)!r}")
        for field in ("r_temperature", "embedding_init_std"):
            value = getattr(self, field)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
                raise ValueError(f"{field} must be None or a positive number, got {value!r}")
        if self.pq_m is not None:
            if isinstance(self.pq_m, bool) or not isinstance(self.pq_m, int) or self.pq_m < 1:
                raise ValueError(f"pq_m must be None or a positive int, got {self.pq_m!r}")
            if self.gsu != "multimodal":
                raise ValueError(f"pq_m applies to the multimodal GSU only, got gsu {self.gsu!r}")
        value = self.pq_candidates
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"pq_candidates must be an int >= 0, got {value!r}")
        if value and (self.pq_m is None or value < self.k):
            raise ValueError(f"pq_candidates must be 0 or >= k ({self.k}) and needs pq_m, got {value!r} (pq_m {self.pq_m!r})")
        width = self.tier_width
        if isinstance(width, bool) or not isinstance(width, (int, float)) or not 0 < width <= 2:
            raise ValueError(f"tier_width must be in (0, 2], got {width!r}")
        if abs(round(2 / width) * width - 2) > 1e-9:
            raise ValueError(f"tier_width must divide [-1, 1] into equal tiers (2 / tier_width an integer), got {width!r}")

    @property
    def num_tiers(self) -> int:
        """Number of SimTier tiers over [-1, 1]."""
        return round(2 / self.tier_width)

    @property
    def uses_history(self) -> bool:
        """True when the GSU runs in the model on the whole history (``hist_*`` features, ``history_scores``)."""
        return self.gsu in IN_MODEL_GSU

    @property
    def uses_lifelong(self) -> bool:
        """True when an ESU runs on K behaviors selected from the lifelong history."""
        return self.gsu != "none"

    @property
    def uses_esu(self) -> bool:
        """True when the model has an ESU: lifelong behaviors, or (``gsu == "none"``) the recent SimTier."""
        return self.uses_lifelong or (self.uses_simtier and self.simtier_recent)

    @property
    def attention_kind(self) -> str | None:
        """``"ta"``, ``"sata"`` or None: the ESU's attention over the K behaviors."""
        head = self.esu.split("+")[0]
        return head if head in ("ta", "sata") else None

    @property
    def uses_simtier(self) -> bool:
        return "simtier" in self.esu.split("+")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """The named preset (see ``preset_names()``), with optional field overrides."""
        if name not in cls.PRESETS:
            raise ValueError(f"name must be one of {cls.preset_names()}, got {name!r}")
        return cls(name=name, **{**cls.PRESETS[name], **overrides})

    @classmethod
    def preset_names(cls) -> tuple[str, ...]:
        return tuple(cls.PRESETS)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists); ``from_dict`` inverts it."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """Inverse of ``to_dict``; unknown keys raise ValueError naming them."""
        reject_unknown_fields(cls, data)
        values = {key: tuple(value) if isinstance(value, list) else value for key, value in data.items()}
        return cls(**values)
