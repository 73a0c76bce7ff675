"""Channel-group patch embedding (SatMAE; SPECS T3).

Bands are split into fixed groups, each with its own patch embedding (a Conv2d taking that
group's bands), so every patch yields one token per group: [B, G * N, D], group major. The ViT
adds ``positions()``: per token ``[2-D sincos of the patch (D - Dg) ‖ 1-D sincos of the group
index (Dg)]`` with Dg = 256 as in SatMAE (for D < 768, Dg = D/3 rounded down to a multiple of
4, which is 256 at D = 768).

Band matching. A group lists band NAMES (the part of the band_id after the colon); names are
normalised so spellings match (``B2`` = ``B02``, ``B08A`` = ``B8A``, any case), and only bands
of ``sensors`` are considered, so e.g. ``ENMAP:B002`` never passes for Sentinel-2 ``B02``.
Wavelengths are not used: a group is a fixed set of named bands. Bands are gathered by name,
so their order in the input does not matter.

Which bands a batch may hold. A group's convolution needs all of its bands, so channel groups
cannot run on an arbitrary band subset (SatMAE's design): a group with some but not all of its
bands is refused with an error naming the missing band and the group. A batch may omit whole
groups; then only the groups present are tokenized and ``tokens_per_patch`` is their number.
Bands in no group (Sentinel-2 B01, B09, B10, as SatMAE drops them) are ignored.

Positions of a variable group set. ``forward`` records the groups it tokenized in
``last_groups``; ``positions()`` encodes those unless given ``groups=`` explicitly (e.g. from
``present_groups(band_ids)``). The group code uses the group's index in the configuration, so
an omitted group never shifts the codes of the others.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from eoforge.models.pos_embed import sincos_1d, sincos_2d

# SatMAE's Sentinel-2 groups: visible + NIR at 10 m, red edge + narrow NIR at 20 m, SWIR at 20 m.
S2_GROUPS: tuple[tuple[str, ...], ...] = (
    ("B02", "B03", "B04", "B08"),
    ("B05", "B06", "B07", "B8A"),
    ("B11", "B12"),
)
S2_SENSORS: tuple[str, ...] = ("S2", "S2L1C", "S2L2A")
GROUP_DIM = 256


class MissingBandError(ValueError):
    """A channel group lacks one of its bands; the message names the band and the group."""


def normalise_band_name(name: str) -> str:
    """Canonical spelling of a band name: ``b2`` / ``B02`` -> ``B02``, ``B08A`` -> ``B8A``."""
    name = name.strip().upper()
    match = re.fullmatch(r"B0*(\d+)(A?)", name)
    if match is None:
        return name
    number, suffix = int(match[1]), match[2]
    return f"B{number}A" if suffix else f"B{number:02d}"


def group_code_dim(embed_dim: int) -> int:
    """Channels of the group code: SatMAE's 256, or D/3 (multiple of 4) when D < 768."""
    return min(GROUP_DIM, embed_dim // 3 // 4 * 4)


class ChannelGroupPatchEmbed(nn.Module):
    """One patch embedding per channel group, one token per group and patch (SPECS T3).

    Args:
        patch_size: side of a square patch in pixels.
        embed_dim: token width D (multiple of 4).
        groups: band names per group (see module docstring for matching).
        sensors: sensors whose bands may fill the groups (the part of the band_id before the
            colon); None accepts any sensor.
        group_dim: channels of the group code; default ``group_code_dim(embed_dim)``.

    Attributes:
        tokens_per_patch: groups tokenized by the last forward (all groups before any).
        last_groups: indices of those groups, ascending.
    """

    def __init__(
        self,
        patch_size: int,
        embed_dim: int,
        groups: Sequence[Sequence[str]] = S2_GROUPS,
        sensors: Sequence[str] | None = S2_SENSORS,
        group_dim: int | None = None,
    ):
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.groups = tuple(tuple(normalise_band_name(b) for b in g) for g in groups)
        self.sensors = None if sensors is None else {s.upper() for s in sensors}
        self.group_dim = group_code_dim(embed_dim) if group_dim is None else group_dim
        if (embed_dim - self.group_dim) % 4 or self.group_dim % 2 or self.group_dim <= 0:
            raise ValueError(
                f"group code of {self.group_dim} channels leaves {embed_dim - self.group_dim} for "
                "the 2-D sincos, which needs a multiple of 4; pick embed_dim/group_dim to suit"
            )
        self.embeds = nn.ModuleList(
            nn.Conv2d(len(g), embed_dim, patch_size, stride=patch_size) for g in self.groups
        )
        self.last_groups = tuple(range(len(self.groups)))
        # (band_ids, device) -> [(group index, channel indices [G_k])] for the groups present.
        self._plans: dict[tuple[tuple[str, ...], torch.device], list] = {}

    @property
    def tokens_per_patch(self) -> int:
        return len(self.last_groups)

    def _describe(self, g: int) -> str:
        return f"group {g} {{{', '.join(self.groups[g])}}}"

    def _channels_by_name(self, band_ids: Sequence[str]) -> dict[str, int]:
        channels: dict[str, int] = {}
        for c, band_id in enumerate(band_ids):
            sensor, _, name = band_id.rpartition(":")
            if self.sensors is not None and sensor.upper() not in self.sensors:
                continue
            name = normalise_band_name(name)
            if name in channels:
                raise ValueError(f"band {band_id!r} appears twice in the input (as {name})")
            channels[name] = c
        return channels

    def plan(self, band_ids: Sequence[str], device: torch.device) -> list:
        """[(group index, channel indices)] of the groups a band set fills; cached per band set.

        Raises:
            MissingBandError: a group has some of its bands but not all, or no group has any.
        """
        key = (tuple(band_ids), device)
        if key in self._plans:
            return self._plans[key]
        channels = self._channels_by_name(band_ids)
        plan = []
        for g, names in enumerate(self.groups):
            missing = [n for n in names if n not in channels]
            if len(missing) == len(names):
                continue  # the whole group is omitted: fine
            if missing:
                raise MissingBandError(
                    f"band {missing[0]} of channel {self._describe(g)} is missing from the input "
                    f"({', '.join(band_ids)}); a channel group needs all its bands: add "
                    f"{', '.join(missing)} or drop the group's other bands"
                )
            index = torch.tensor([channels[n] for n in names], device=device)
            plan.append((g, index))
        if not plan:
            raise MissingBandError(
                f"no channel group is filled by the input bands ({', '.join(band_ids)}); groups: "
                f"{'; '.join(self._describe(g) for g in range(len(self.groups)))}"
            )
        self._plans[key] = plan
        return plan

    def present_groups(self, band_ids: Sequence[str]) -> tuple[int, ...]:
        """Indices of the groups a band set fills (what ``forward`` would tokenize)."""
        return tuple(g for g, _ in self.plan(band_ids, torch.device("cpu")))

    def forward(
        self, images: torch.Tensor, band_ids: Sequence[str], wavelengths: torch.Tensor
    ) -> torch.Tensor:
        """images [B, C, H, W] -> tokens [B, G * N, D], group major, no positions.

        ``wavelengths`` is accepted for the tokenizer contract; groups are matched by name.
        """
        plan = self.plan(band_ids, images.device)
        dtype = self.embeds[0].weight.dtype  # under bf16 engines the weights set the dtype
        tokens = [
            self.embeds[g](images.index_select(1, index).to(dtype)).flatten(2).transpose(1, 2)
            for g, index in plan
        ]  # G x [B, N, D]
        self.last_groups = tuple(g for g, _ in plan)
        return torch.cat(tokens, dim=1)

    def positions(
        self,
        grid_h: int,
        grid_w: int,
        like: torch.Tensor,
        groups: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """[2-D sincos ‖ group sincos] [G * N, D] for ``groups`` (default: ``last_groups``)."""
        groups = self.last_groups if groups is None else tuple(groups)
        spatial = sincos_2d(grid_h, grid_w, self.embed_dim - self.group_dim, like.device)
        index = torch.tensor(groups, device=like.device)
        code = sincos_1d(index, self.group_dim).float()  # [G, Dg]
        n, g = spatial.shape[0], len(groups)
        table = torch.cat(
            [spatial[None].expand(g, -1, -1), code[:, None].expand(-1, n, -1)], dim=-1
        )  # [G, N, D]
        return table.reshape(g * n, self.embed_dim).to(like.dtype)
