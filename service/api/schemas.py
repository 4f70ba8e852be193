"""Request and response bodies (pydantic): what /openapi.json publishes."""

from __future__ import annotations

from typing import Literal

from fastapi import UploadFile
from pydantic import BaseModel, ConfigDict, Field


class TargetSpec(BaseModel):
    """A quality target. None of them = the server's default (`max_l1` 0.07 unless configured)."""

    model_config = ConfigDict(extra="forbid")
    max_l1: float | None = Field(None,
                                 description="Mean absolute pixel error in [0, 1] the reconstruction must "
                                             "reach.", examples=[0.07])
    min_psnr: float | None = Field(None,
                                   description="PSNR in dB the clamped reconstruction must reach.", examples=[24.0])
    tokens: int | None = Field(None,
                               description="Exact token budget (ALIT: a multiple of the tokens per iteration); no "
                                           "quality is measured. Not every family takes it (see /v1/models "
                                           "`accepts`).", examples=[128])
    max_tokens: int | None = Field(None, description="Cap on tokens for a quality target (KARL: its token budget "
                                                     "input).", examples=[192])


class ImageItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: str = Field(..., description="The encoded image (PNG, JPEG, WebP, GIF, BMP, TIFF), base64.")
    target: TargetSpec | None = None


class TokenizeOptions(BaseModel):
    """What to return besides the tokens; the same in both request forms."""

    include_reconstruction: bool = Field(False,
                                         description="Add the reconstruction of the returned tokens as a base64 PNG.")
    all_iterations: bool = Field(False, description="Add the token ids and quality of every iteration run.")
    stream: bool = Field(False, description="Answer as NDJSON: one event per iteration, then the result.")


MODEL_FIELD = Field(None, description="The served model to use (an id of /v1/models); absent: the default model.",
                    examples=["karl"])


class TokenizeJSON(TokenizeOptions):
    """`application/json`: a batch of base64 images, each with its own target."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = MODEL_FIELD
    images: list[ImageItem] = Field(..., min_length=1, description="One or more images, each with its own target.")


class TokenizeForm(TargetSpec, TokenizeOptions):
    """`multipart/form-data`: one image (`file`) with the target fields and options as form fields."""

    model_config = ConfigDict(extra="forbid")
    file: UploadFile = Field(..., description="The image (PNG, JPEG, WebP, GIF, BMP, TIFF).")
    model: str | None = MODEL_FIELD

    def target(self) -> dict[str, float | int]:
        """The target fields that were given, as the JSON form's `target` object holds them."""
        return {k: getattr(self, k) for k in TargetSpec.model_fields if getattr(self, k) is not None}


POSITIONS_FIELD = Field(None, description="Each id's position in the model's token sequence, for a family whose "
                        "tokens carry one (KARL halts tokens anywhere); absent for ALIT. Send it back to "
                        "/v1/reconstruct with the ids.")


class IterationOut(BaseModel):
    iteration: int = Field(..., description="The probe's key: ALIT's iteration; see `probe` for other families.")
    num_tokens: int
    token_ids: list[int]
    positions: list[int] | None = POSITIONS_FIELD
    l1: float | None = None
    psnr: float | None = None
    probe: dict | None = Field(None, description="What the probe ran, where the key alone does not say "
                                                 "(KARL: its token budget and quality conditioning).")


class Timings(BaseModel):
    queue_ms: float = Field(..., description="Waiting for admission.")
    compute_ms: float = Field(..., description="From admission to the answer.")
    total_ms: float = Field(..., description="The whole request for this image, cache included.")


class TokenizeResultOut(BaseModel):
    token_ids: list[int]
    positions: list[int] | None = POSITIONS_FIELD
    num_tokens: int
    iterations: int = Field(..., description="Probes run: ALIT's iterations (the halting iteration); KARL's passes.")
    l1: float | None = Field(None, description="L1 of the returned tokens' reconstruction; null for a token budget.")
    psnr: float | None = None
    target_met: bool
    cached: bool
    target: TargetSpec
    timings: Timings
    reconstruction_png: str | None = Field(None, description="base64 PNG, when include_reconstruction.")
    all_iterations: list[IterationOut] | None = None


class ModelRef(BaseModel):
    id: str
    family: str
    fingerprint: str


class TokenizeResponse(BaseModel):
    model: ModelRef
    results: list[TokenizeResultOut]


class ReconstructJSON(BaseModel):
    model_config = ConfigDict(extra="forbid")
    token_ids: list[int] | list[list[int]] = Field(
        ..., description="One token sequence, or a batch of them (ALIT: each a multiple of the tokens per "
                         "iteration).")
    positions: list[int] | list[list[int]] | None = Field(
        None, description="For a model whose tokens carry positions (KARL): the ids' positions, shaped like "
                          "token_ids, as /v1/tokenize returned them; absent: 0, 1, 2, ...")
    model: str | None = MODEL_FIELD


class ReconstructImage(BaseModel):
    num_tokens: int
    png: str = Field(..., description="base64 PNG")


class ReconstructResponse(BaseModel):
    model: ModelRef
    images: list[ReconstructImage]


class ModelInfo(BaseModel):
    """A served model. Family-specific facts follow the common fields (ALIT: `tokens_per_iteration`,
    `max_iterations`; KARL: `quality_bins`, `default_budget`, `min_budget`, `retry_stricter`)."""

    model_config = ConfigDict(extra="allow")
    id: str
    family: str = Field(..., description="alit | karl | titok (One-D-Piece, TiTok)")
    default: bool = Field(..., description="Used when a request names no model.")
    fingerprint: str
    preset: str | None
    source: str
    image_size: int
    max_tokens: int
    codebook_size: int
    accepts: list[str] = Field(..., description="The target fields this model honours; others are a 422.")
    probe_name: list[str] = Field(..., description="What one probe is called, and several: iteration (ALIT), pass "
                                                   "(KARL), prefix (One-D-Piece: a probe decodes one prefix length).")
    token_positions: bool = Field(..., description="Its token ids come with positions (send them to /reconstruct).")
    default_target: TargetSpec
    halting: bool | None = Field(..., description="`ALIT_HALTING` where it changes this model's tokens "
                                                  "(ALIT's 2D-token halting); null where it does not apply.")
    tokens_per_iteration: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelInfo]


class ErrorDetail(BaseModel):
    code: str
    message: str
    detail: object | None = None
    request_id: str | None = Field(None, description="The request's X-Request-ID (the caller's, or one made for it)")


class ErrorResponse(BaseModel):
    error: ErrorDetail
