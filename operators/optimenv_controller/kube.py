"""The one module that talks to the Kubernetes API server (through lightkube).

Reads are plain GETs, and lists and watches (with a label selector) that feed the child cache; a
child absent when read is created by ``POST`` (so that an object of the
same name that appeared meanwhile is refused with 409, never merged into and adopted), a child that
exists is written by server-side apply (``PATCH`` with ``application/apply-patch+yaml``), both with
``fieldManager=optimenv``; status by a merge patch of the
``/status`` subresource, Events by ``POST``. Every failure comes out as :class:`Retryable` (try again
later: 409, 429, 5xx, timeouts, connection errors) or :class:`ApiFailure` (retrying cannot help).
"""

from __future__ import annotations

import asyncio
import datetime
import secrets
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx2
from lightkube import AsyncClient, KubeConfig, operators
from lightkube.config.models import Cluster, User
from lightkube.core.exceptions import ApiError
from lightkube.core.exceptions import ConfigError as LightkubeConfigError
from lightkube.generic_resource import GenericNamespacedResource, create_namespaced_resource
from lightkube.models.core_v1 import EventSource, ObjectReference
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import ConfigMap
from lightkube.resources.core_v1 import Event as CoreEvent
from lightkube.types import PatchType, on_error_raise

from optimenv.resource import GROUP, KIND, PLURAL, VERSION
from optimenv_controller.reconcile import FIELD_MANAGER

OptimEnvResource = create_namespaced_resource(GROUP, VERSION, KIND, PLURAL)
_RESOURCES: dict[tuple[str, str], Any] = {
    ("v1", "ConfigMap"): ConfigMap,
    (f"{GROUP}/{VERSION}", KIND): OptimEnvResource,
}
_RETRY_STATUSES = frozenset({409, 429, 500, 502, 503, 504})


class KubeError(Exception):
    """A failed API call; ``status`` is the HTTP status, 0 when no answer came."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class Retryable(KubeError):
    """Worth retrying after ``delay`` seconds (the server's Retry-After when it gave one)."""

    def __init__(self, message: str, status: int = 0, delay: float = 1.0) -> None:
        super().__init__(message, status)
        self.delay = delay


class ApiFailure(KubeError):
    """Retrying the same request cannot succeed (400, 403, 404 of a resource, 422 …)."""


class Gone(KubeError):
    """A watch's resourceVersion is too old (410): list again."""


def _resource(api_version: str, kind: str) -> Any:
    key = (api_version, kind)
    if key not in _RESOURCES:
        group, _, version = api_version.rpartition("/")
        # Every kind the renderers produce pluralises by a trailing "s" (rayjobs, pytorchjobs, trainjobs).
        _RESOURCES[key] = create_namespaced_resource(group, version, kind, kind.lower() + "s")
    return _RESOURCES[key]


def _to_dict(obj: Any) -> dict[str, Any]:
    if isinstance(obj, GenericNamespacedResource):
        return dict(obj.to_dict())  # type: ignore[no-untyped-call]
    data: dict[str, Any] = obj.to_dict()
    return data


def _selector(labels: Mapping[str, str], exclude: bool) -> dict[str, Any] | None:
    """lightkube's label selector: each label equal to its value, or (``exclude``) not."""
    if not labels:
        return None
    return {k: operators.not_equal(v) if exclude else v for k, v in labels.items()}


def _typed(body: dict[str, Any], api_version: str, kind: str) -> dict[str, Any]:
    """An object with its apiVersion and kind (list items of built-in kinds leave them out)."""
    body.setdefault("apiVersion", api_version)
    body.setdefault("kind", kind)
    return body


def _retry_after(response: httpx2.Response, default: float) -> float:
    value = response.headers.get("Retry-After")
    try:
        return max(0.0, float(value)) if value is not None else default
    except ValueError:
        return default


def _has_response(exc: httpx2.HTTPStatusError) -> bool:
    return getattr(exc, "response", None) is not None


def _status(exc: httpx2.HTTPStatusError) -> tuple[int, str]:
    """HTTP status and message of a refusal; a watch stream's ERROR event has no response of its own."""
    if isinstance(exc, ApiError) and not _has_response(exc):
        return int(exc.status.code or 0), str(exc.status.message or "")
    try:
        message = str(exc.response.json().get("message") or exc.response.reason_phrase)
    except ValueError:
        message = exc.response.reason_phrase
    return exc.response.status_code, message


def translate(exc: Exception, what: str) -> KubeError:
    """Map a client exception to :class:`Retryable` or :class:`ApiFailure`."""
    if isinstance(exc, httpx2.HTTPStatusError):
        code, message = _status(exc)
        text = f"{what}: {code} {message}"
        if code in _RETRY_STATUSES or code >= 500:
            # 409 from apply is a field-ownership race and from create an object that appeared meanwhile:
            # both resolve on the next reconcile, which reads the object again.
            default = 2.0 if code == 429 else 1.0
            delay = _retry_after(exc.response, default) if _has_response(exc) else default
            return Retryable(text, code, delay)
        return ApiFailure(text, code)
    if isinstance(exc, httpx2.TimeoutException):
        return Retryable(f"{what}: timed out", 0, 1.0)
    if isinstance(exc, httpx2.TransportError):
        return Retryable(f"{what}: {type(exc).__name__}: {exc}", 0, 1.0)
    return ApiFailure(f"{what}: {type(exc).__name__}: {exc}")


#: Objects per page of a list: a cluster's ConfigMaps come in pages, not in one response.
LIST_CHUNK = 500
#: Requests in flight at once (watches excepted): more only queue up in the connection pool, whose
#: bookkeeping grows with every waiting request and every open connection.
IN_FLIGHT = 16


class Kube:
    """A lightkube client with the few calls the controller makes."""

    def __init__(self, client: AsyncClient, *, in_flight: int = IN_FLIGHT) -> None:
        self._client = client
        self._slots = asyncio.Semaphore(in_flight)

    @classmethod
    def from_environment(cls, *, timeout: float = 30.0) -> Kube:
        """In-cluster service account when there is one, else ``KUBECONFIG`` / ``~/.kube/config``."""
        try:
            config = KubeConfig.from_env()
        except (LightkubeConfigError, OSError) as exc:
            raise ApiFailure(
                f"no Kubernetes credentials: {exc} (run in a pod with a service account, or set KUBECONFIG)"
            ) from None
        return cls(AsyncClient(config, timeout=httpx2.Timeout(timeout), field_manager=FIELD_MANAGER))

    @classmethod
    def for_server(cls, url: str, *, token: str = "x", timeout: float = 30.0) -> Kube:
        """A client of one API server URL (tests and benchmarks against kmock)."""
        config = KubeConfig.from_one(cluster=Cluster(server=url, insecure=True), user=User(token=token))
        return cls(AsyncClient(config, timeout=httpx2.Timeout(timeout), field_manager=FIELD_MANAGER))

    async def close(self) -> None:
        await self._client.close()

    async def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The object as a dict, or None when it does not exist."""
        what = f"get {kind} {namespace}/{name}"
        try:
            async with self._slots:
                found = await self._client.get(_resource(api_version, kind), name, namespace=namespace)
            return _typed(_to_dict(found), api_version, kind)
        except httpx2.HTTPStatusError as exc:
            if exc.response.status_code == 404:
                return None
            raise translate(exc, what) from exc
        except httpx2.HTTPError as exc:
            raise translate(exc, what) from exc

    async def list(
        self,
        api_version: str,
        kind: str,
        namespace: str | None,
        labels: Mapping[str, str],
        *,
        exclude: bool = False,
    ) -> tuple[list[dict[str, Any]], str]:
        """Every object of a kind (in ``namespace``, or all namespaces) carrying ``labels`` (with
        ``exclude``: not carrying them); and the list's resourceVersion, to watch from."""
        where = f"list {kind} in {namespace or 'all namespaces'}"
        try:
            found = self._client.list(
                _resource(api_version, kind),
                namespace=namespace or "*",
                labels=_selector(labels, exclude),
                chunk_size=LIST_CHUNK,
            )
            items = [_typed(_to_dict(obj), api_version, kind) async for obj in found]
            return items, found.resourceVersion
        except httpx2.HTTPError as exc:
            raise translate(exc, where) from exc

    async def watch(
        self,
        api_version: str,
        kind: str,
        namespace: str | None,
        labels: Mapping[str, str],
        resource_version: str,
        *,
        exclude: bool = False,
        server_timeout: int = 300,
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """(type, object) for every change after ``resource_version``; ends only by an error.

        A stream the server closes (its timeout) is resumed from the last event seen. 410 Gone raises
        :class:`Gone`; anything else is translated like every other call.
        """
        where = f"watch {kind} in {namespace or 'all namespaces'}"
        stream = self._client.watch(
            _resource(api_version, kind),
            namespace=namespace or "*",
            labels=_selector(labels, exclude),
            resource_version=resource_version,
            server_timeout=server_timeout,
            on_error=on_error_raise,
        )
        try:
            async for type_, obj in stream:
                yield type_, _typed(_to_dict(obj), api_version, kind)
        except httpx2.HTTPStatusError as exc:
            if _status(exc)[0] == 410:
                raise Gone(f"{where}: 410 resourceVersion too old", 410) from exc
            raise translate(exc, where) from exc
        except httpx2.HTTPError as exc:
            raise translate(exc, where) from exc

    async def create(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Create a child that was absent when read; 409 (it appeared meanwhile) is :class:`Retryable`."""
        meta = body["metadata"]
        what = f"create {body['kind']} {meta['namespace']}/{meta['name']}"
        try:
            async with self._slots:
                written = await self._client.create(
                    _resource(body["apiVersion"], body["kind"]).from_dict(
                        dict(body)
                    ),  # namespace: its metadata
                    field_manager=FIELD_MANAGER,
                )
        except httpx2.HTTPError as exc:
            raise translate(exc, what) from exc
        return _typed(_to_dict(written), body["apiVersion"], body["kind"])

    async def apply(self, body: Mapping[str, Any], *, force: bool) -> dict[str, Any]:
        """Server-side apply of the full desired object under the ``optimenv`` field manager."""
        meta = body["metadata"]
        what = f"apply {body['kind']} {meta['namespace']}/{meta['name']}"
        try:
            async with self._slots:
                written = await self._client.patch(
                    _resource(body["apiVersion"], body["kind"]),
                    meta["name"],
                    dict(body),
                    namespace=meta["namespace"],
                    patch_type=PatchType.APPLY,
                    field_manager=FIELD_MANAGER,
                    force=force,
                )
        except httpx2.HTTPError as exc:
            raise translate(exc, what) from exc
        return _typed(_to_dict(written), body["apiVersion"], body["kind"])

    async def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> dict[str, Any]:
        """Merge-patch ``status`` through the status subresource (conditions are replaced whole); the
        object as stored afterwards."""
        what = f"patch status of {KIND} {namespace}/{name}"
        try:
            async with self._slots:
                written = await self._client.patch(
                    OptimEnvResource.Status,
                    name,
                    {"status": dict(status)},
                    namespace=namespace,
                    patch_type=PatchType.MERGE,
                    field_manager=FIELD_MANAGER,
                )
        except httpx2.HTTPError as exc:
            raise translate(exc, what) from exc
        return _typed(_to_dict(written), f"{GROUP}/{VERSION}", KIND)

    async def create_event(
        self, obj: Mapping[str, Any], type_: str, reason: str, message: str, *, component: str = "optimenv"
    ) -> None:
        meta = obj["metadata"]
        now = datetime.datetime.now(tz=datetime.UTC)
        event = CoreEvent(
            metadata=ObjectMeta(name=f"{meta['name']}.{secrets.token_hex(8)}", namespace=meta["namespace"]),
            involvedObject=ObjectReference(
                apiVersion=obj.get("apiVersion", f"{GROUP}/{VERSION}"),
                kind=obj.get("kind", KIND),
                name=meta["name"],
                namespace=meta["namespace"],
                uid=meta.get("uid"),
                resourceVersion=meta.get("resourceVersion"),
            ),
            reason=reason,
            message=message[:1024],
            type=type_,
            source=EventSource(component=component),
            firstTimestamp=now,
            lastTimestamp=now,
            count=1,
        )
        try:
            async with self._slots:
                await self._client.create(event)
        except httpx2.HTTPError as exc:
            raise translate(exc, f"create Event for {KIND} {meta['namespace']}/{meta['name']}") from exc
