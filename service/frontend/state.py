"""What every servicer of a frontend process shares: the models served, the settings, draining."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import grpc

from service.engine.protocol import ModelSource
from service.errors import DeadlineExceeded, InvalidArgument, Unavailable
from service.settings import Settings

if TYPE_CHECKING:
    from service.catalog import LoadedModel


class ServingState:
    """What every servicer needs to know about the server: the models it serves (the engine, or
    the gradient tier's catalog), the settings, and whether requests are accepted (models loaded
    and not shutting down)."""

    def __init__(self, models: ModelSource, settings: Settings) -> None:
        self.models = models
        self.settings = settings
        self.draining = False

    @property
    def ready(self) -> bool:
        """The server as a whole is ready (overall health, OIP ServerReady): every selected model
        loaded, or with serve_when=any the first one."""
        if self.draining:
            return False
        return self.accepting if self.settings.serve_when == "any" else self.models.ready

    @property
    def accepting(self) -> bool:
        """Requests are taken: some model version serves (an engine that loads progressively says
        so before it is fully `ready`; a version still loading then answers UNAVAILABLE itself)."""
        return not self.draining and bool(getattr(self.models, "accepting", self.models.ready))

    def model_ready(self, model: LoadedModel) -> bool:
        """This version is loaded, warm and taking requests."""
        version_ready = getattr(self.models, "version_ready", None)
        if self.draining:
            return False
        return bool(version_ready(model)) if version_ready is not None else self.models.ready

    def check_ready(self) -> None:
        """Raise Unavailable unless requests are being accepted."""
        if self.draining:
            raise Unavailable("server is shutting down; retry on another replica", reason="shutting_down")
        if not self.accepting:
            # An engine process being replaced says so (service/engine/remote.py); else: starting.
            why = getattr(self.models, "why_not_ready", None)
            raise Unavailable(why or "server is starting: models are still loading", reason="not_ready")

    def deadline(self, context: grpc.aio.ServicerContext, *, cap_longer: bool = False) -> float:
        """The call's deadline as an absolute time.monotonic().

        A call without a deadline gets max_deadline_s. A deadline longer than max_deadline_s is a
        request over a cap: InvalidArgument naming it (the client asked for more time than this
        server grants; it learns so at once instead of being cut off later). `cap_longer=True`
        caps it instead: for the items of a ClassifyStream, whose deadline bounds the whole
        stream, not one item. Raises DeadlineExceeded when the deadline has already passed.
        """
        return self.deadline_in(context.time_remaining(), cap_longer=cap_longer)

    def deadline_in(self, remaining: float | None, *, cap_longer: bool = False) -> float:
        """`deadline` for a call whose client asked for `remaining` seconds (None: no deadline),
        by any protocol (REST: the timeout parameter or header)."""
        cap = self.settings.max_deadline_s
        # gRPC rounds a deadline up when it encodes it (grpc-timeout keeps about three significant
        # digits: 30 s arrives as 30.1 s, 600 s as 601 s, 3600 s as 3610 s), so a client asking for
        # exactly the cap is not refused: only what exceeds it by more than that rounding.
        if remaining is not None and remaining > cap * 1.01 + 0.1 and not cap_longer:
            raise InvalidArgument(
                f"the call's deadline is {remaining:.0f} s away; max_deadline_s is {cap:g} s "
                "(send a shorter deadline, or none to get max_deadline_s)",
                reason="deadline_too_long",
            )
        if remaining is None or remaining > cap:
            remaining = cap
        if remaining <= 0:
            raise DeadlineExceeded("the deadline passed before the request was handled", reason="deadline")
        return time.monotonic() + float(remaining)

    def check_image_count(self, count: int) -> None:
        cap = self.settings.max_images_per_request
        if count > cap:
            raise InvalidArgument(
                f"{count} images in one request; max_images_per_request is {cap}", reason="too_many_images"
            )

    def resolve_model(self, name: str, version: int) -> LoadedModel:
        """The loaded model for a request's (name, version); version 0 means the latest."""
        if not name:
            raise InvalidArgument("model is required (see ListModels)", reason="invalid_argument")
        if version < 0:
            raise InvalidArgument(
                f"version must be >= 0 (0 = latest), got {version}", reason="invalid_argument"
            )
        return self.models.get(name, version or None)


__all__ = ["ServingState"]
