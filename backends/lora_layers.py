"""LoRA layers: a frozen base module plus a trainable low-rank delta ``B @ A * alpha / rank``
(``alpha / sqrt(rank)`` with rank-stabilised scaling, ``rslora=True``). A linear layer's
adapter may start at the weight's principal singular directions (``init="pissa"``) or at its
gradient's (``init="lora_ga"``).

Parameter shapes and initialisation follow peft, so weights copy across one to one and the
wrapped module computes exactly what the base computes until ``lora_B`` (or, for embeddings,
``lora_A``) leaves zero:

    >>> import torch, torch.nn as nn
    >>> base = nn.Linear(4, 3)
    >>> layer = LoRALinear(base, rank=2, alpha=4)
    >>> x = torch.randn(5, 4)
    >>> torch.equal(layer(x), base(x))
    True
    >>> layer.lora_A.shape, layer.lora_B.shape
    (torch.Size([2, 4]), torch.Size([3, 2]))

Adapters may be kept in a wider dtype than the base (fp32 beside bf16); the output keeps the
base's dtype. ``merge()`` folds the delta into the base weight (``forward`` then skips it) and ``unmerge()``
takes it out again; adapter parameters are created on the base weight's device and dtype, so
wrapping a model on the meta device allocates nothing.
"""

from __future__ import annotations

import abc
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ir.modules import is_hf_conv1d, module_features
from .wrapper import Wrapper, restoring


class LoRALayer(Wrapper, abc.ABC):
    """What every LoRA layer shares: the frozen ``base``, the scaling and the merge logic.

    Subclasses set ``lora_A``/``lora_B`` and define ``_delta(A, B)`` in the layout of
    ``base.weight``.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, rslora: bool = False) -> None:
        super().__init__(base)
        self.rank = rank
        self.alpha = alpha
        self.rslora = rslora
        self.init = "zero"  # how A and B start (`LoRALinear` may start from the weight's principal directions)
        # rsLoRA (Kalajdzievski, 2023): alpha/sqrt(r) keeps the update's scale stable as r grows
        self.scaling = alpha / math.sqrt(rank) if rslora else alpha / rank

    def _new(self, *shape: int) -> nn.Parameter:
        w = self.base.weight
        return nn.Parameter(torch.empty(*shape, device=w.device, dtype=w.dtype))

    def delta_weight(self) -> torch.Tensor:
        """``B @ A * scaling`` in the layout and dtype of ``base.weight``."""
        a, b, w = self.lora_A, self.lora_B, self.base.weight
        # bf16/fp16 matmuls are slow and lossy on CPU: form the delta in fp32, as peft does.
        if w.device.type == "cpu" and w.dtype in (torch.float16, torch.bfloat16):
            a, b = a.float(), b.float()
        return self._delta(a, b).to(w.dtype)

    @abc.abstractmethod
    def _delta(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``B @ A`` laid out like ``base.weight`` (a Linear's ``(out, in)``, a Conv1D's ``(in, out)``…)."""

    @torch.no_grad()
    def merge(self) -> None:
        """Add the delta to ``base.weight``; ``forward`` stops adding it. Merging twice is a no-op."""
        if not self.merged:
            self.base.weight.add_(self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the delta from ``base.weight`` again (exact up to float rounding)."""
        if self.merged:
            self.base.weight.sub_(self.delta_weight())
            self.merged = False

    def extra_repr(self) -> str:
        start = f", init={self.init}" if self.init != "zero" else ""
        return f"rank={self.rank}, alpha={self.alpha}, rslora={self.rslora}{start}, merged={self.merged}"


class LoRALinear(LoRALayer):
    """LoRA on ``nn.Linear`` or HF ``Conv1D`` (whose weight is stored transposed, (in, out)).

    ``init="zero"`` starts as peft does (A Kaiming-uniform, B zero); ``init="pissa"`` (Meng et
    al., 2024) starts A and B at the weight's top-``rank`` singular directions, so that
    ``B @ A * scaling`` is its best rank-r approximation; ``init="lora_ga"`` (Wang et al., 2024)
    at the top-2r singular directions of ``gradient``, the weight's mean gradient on a few
    training batches, so that the first steps move the delta the way full fine-tuning's first
    step would. Either start is kept as the frozen buffers ``lora_A0``/``lora_B0`` and
    subtracted, so the delta ``(B @ A - B0 @ A0) * scaling`` starts at zero and the base weight
    is never changed: what peft trains (the residual weight frozen and fed the input before
    dropout), with merge, unmerge and removal as for any LoRA. Loaded onto other weights, a
    saved site adds the same change to them.
    """

    def __init__(
        self,
        base: nn.Module,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
        init: str = "zero",
        gradient: torch.Tensor | None = None,
    ) -> None:
        super().__init__(base, rank, alpha, rslora)
        self.fan_in_fan_out = is_hf_conv1d(base)
        self.init = init
        n_in, n_out = module_features(base)
        self.lora_A = self._new(rank, n_in)
        self.lora_B = self._new(n_out, rank)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if init == "pissa":
            self._start_at_principal_directions()
        elif init == "lora_ga":
            self._start_at_gradient_directions(gradient)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    @torch.no_grad()
    def _start_at_principal_directions(self) -> None:
        """A = sqrt(S_r / s) V_r^T and B = U_r sqrt(S_r / s) from the SVD W = U S V^T (in fp32),
        as peft's ``init_lora_weights="pissa"``; copied into the buffers ``lora_A0``/``lora_B0``.
        A weight on the meta device, or one `peftplan.load` rebuilds, gets empty buffers (the saved
        ones are copied in)."""
        w = self.base.weight
        if w.device.type != "meta" and not restoring.get():  # `load` copies the saved start in
            w = (w.T if self.fan_in_fan_out else w).float()  # (out, in)
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            root = (s[: self.rank] / self.scaling).sqrt()
            self.lora_A.copy_(root[:, None] * vh[: self.rank])  # (r, in)
            self.lora_B.copy_(u[:, : self.rank] * root)  # (out, r)
        self._freeze_start()

    @torch.no_grad()
    def _start_at_gradient_directions(self, gradient: torch.Tensor | None) -> None:
        """LoRA-GA's start as peft makes it (``init_lora_weights="lora_ga"``, its default
        `LoraGAConfig`: direction "ArB2r", scale "stable", gamma 16), from the exact SVD of
        ``gradient`` = U S V^T (peft: 4 subspace iterations of a randomised one): A = V_r^T,
        the first r right directions, and B = U_{r:2r} S_{r:2r} · out^(1/4) / 4, the next r
        left ones (out: the output size; peft takes the stored weight's first size, which for
        an HF Conv1D is its input size); copied into the buffers ``lora_A0``/``lora_B0``.
        On the meta device or while `peftplan.load` rebuilds, no gradient is needed: the
        buffers are made empty (the saved ones are copied in)."""
        if self.base.weight.device.type != "meta" and not restoring.get():
            if gradient is None:
                raise ValueError("a LoRA-GA start needs the weight's mean gradient (gradient=)")
            g = (gradient.T if self.fan_in_fan_out else gradient).float().to(self.lora_A.device)  # (out, in)
            if tuple(g.shape) != (self.lora_B.shape[0], self.lora_A.shape[1]):
                raise ValueError(f"gradient of shape {tuple(gradient.shape)} does not fit this layer's weight")
            u, s, vh = torch.linalg.svd(g, full_matrices=False)
            r = self.rank
            self.lora_A.copy_(vh[:r])  # (r, in)
            self.lora_B.copy_(u[:, r : 2 * r] * s[r : 2 * r] * g.shape[0] ** 0.25 / 4)  # (out, r)
        self._freeze_start()

    def _freeze_start(self) -> None:
        self.register_buffer("lora_A0", self.lora_A.detach().clone())
        self.register_buffer("lora_B0", self.lora_B.detach().clone())

    def _delta(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.init != "zero":  # (B − B0)·A + B0·(A − A0): the start never cancels in low precision
            a0, b0 = self.lora_A0.to(a.dtype), self.lora_B0.to(b.dtype)
            product = (b - b0) @ a + b0 @ (a - a0)
        else:
            product = b @ a
        delta = product * self.scaling  # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base(x, *args, **kwargs)  # (..., out)
        if self.merged:
            return y
        x = x.to(self.lora_A.dtype)
        return y + self._lora(self.dropout(x), x).to(y.dtype)  # (..., out)

    def _lora(self, x: torch.Tensor, clean: torch.Tensor | None = None) -> torch.Tensor:
        """The scaled adapter path ``s·B·A·x`` in the adapters' dtype, (..., in) -> (..., out);
        from a frozen start ``s·(B·A·x − B0·A0·clean)``, ``clean`` the input before dropout, as
        ``s·((B − B0)·A·x + B0·((A − A0)·x + A0·(x − clean)))``: exactly zero at the start."""
        if self.init == "zero":
            return F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling
        a0, b0 = self.lora_A0.to(x.dtype), self.lora_B0.to(x.dtype)
        h = F.linear(x, self.lora_A - a0)  # (..., r)
        if clean is not None and clean is not x:  # dropout on: the frozen start sees the clean input
            h = h + F.linear(x - clean, a0)
        return (F.linear(F.linear(x, self.lora_A), self.lora_B - b0) + F.linear(h, b0)) * self.scaling  # (..., out)


class LoRAConv2d(LoRALayer):
    """LoRA on ``nn.Conv2d`` (groups 1): A is a (r, in, kh, kw) convolution with the base's
    stride, padding and dilation, B a 1x1 convolution (out, r, 1, 1)."""

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False) -> None:
        super().__init__(base, rank, alpha, rslora)
        if base.groups != 1:
            raise ValueError(f"LoRAConv2d supports groups=1 only, got groups={base.groups}")
        self.lora_A = self._new(rank, base.in_channels, *base.kernel_size)
        self.lora_B = self._new(base.out_channels, rank, 1, 1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def _delta(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # A 1x1 convolution after a kxk one is one kxk convolution with weight B·A per tap.
        return torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a) * self.scaling  # (out, in, kh, kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (N, out, H', W')
        if self.merged:
            return y
        return y + self._lora(self.dropout(x.to(self.lora_A.dtype))).to(y.dtype)  # (N, out, H', W')

    def _lora(self, x: torch.Tensor) -> torch.Tensor:
        """The scaled adapter path in the adapters' dtype: (N, in, H, W) -> (N, out, H', W')."""
        # _conv_forward applies the base's padding mode, stride and dilation to our weight.
        h = self.base._conv_forward(x, self.lora_A, None)  # (N, r, H', W')
        return F.conv2d(h, self.lora_B) * self.scaling  # (N, out, H', W')


class LoRAEmbedding(LoRALayer):
    """LoRA on ``nn.Embedding``: A (r, num_embeddings) starts at zero, B (dim, r) normal."""

    def __init__(self, base: nn.Embedding, rank: int, alpha: float, rslora: bool = False) -> None:
        super().__init__(base, rank, alpha, rslora)
        self.lora_A = self._new(rank, base.num_embeddings)
        self.lora_B = self._new(base.embedding_dim, rank)
        nn.init.zeros_(self.lora_A)
        nn.init.normal_(self.lora_B)

    def _delta(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (b @ a).T * self.scaling  # (num_embeddings, dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y = self.base(ids)  # (..., dim)
        if self.merged:
            return y
        h = F.embedding(ids, self.lora_A.T, padding_idx=self.base.padding_idx)  # (..., r)
        return y + (h @ self.lora_B.T * self.scaling).to(y.dtype)  # (..., dim)
