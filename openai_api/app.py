"""The HTTP layer: OpenAI's routes, each a thin call into the engine. Errors leave in OpenAI's shape."""

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ApiError
from .files import FINE_TUNE, IncomingFile, refuse_purpose
from .interface import Engine
from .jobs import CreateJobRequest
from .multipart import DROPPED, FileSink, read_form

log = logging.getLogger("tuneloom.api")

INFERENCE_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
OPEN_ROUTES = ("/health", "/metrics")
# POST /v1/files as the OpenAI SDK's files.create sends it; the route reads the body itself.
UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "purpose"],
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "the JSONL file"},
                        "purpose": {"type": "string", "enum": ["fine-tune"]},
                    },
                }
            }
        },
    }
}


class RequestMetrics:
    """Counts each request by route and code and times it to its first byte. A plain ASGI
    middleware: Starlette's `@app.middleware("http")` would relay every chunk of a streamed body
    (an upload, a proxied completion stream) through a task group of its own."""

    def __init__(self, app: ASGIApp, engine: Engine):
        self.app, self.engine = app, engine

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, counted = time.perf_counter(), False

        def count(code: int) -> None:
            nonlocal counted
            counted = True
            route = getattr(scope.get("route"), "path", "(unmatched)")  # set by the router on this scope
            self.engine.metrics.requests.labels(route, str(code)).inc()
            self.engine.metrics.duration.labels(route).observe(time.perf_counter() - started)

        async def send_counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                count(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            if not counted:  # it raised before answering: the server's error handler answers 500
                count(500)


def create_app(engine: Engine) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await engine.close()

    app = FastAPI(title="tuneloom api", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def project(authorization: Annotated[str | None, Header()] = None) -> str:
        scheme, _, key = (authorization or "").partition(" ")
        found = engine.keys.project_of(key.strip()) if scheme.lower() == "bearer" and key.strip() else None
        if found is None:
            raise ApiError(
                401,
                "Incorrect or missing API key; send `Authorization: Bearer <key>` with a key from the API's keys",
                code="invalid_api_key",
            )
        return found

    Project = Annotated[str, Depends(project)]

    app.add_middleware(RequestMetrics, engine=engine)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [e for e in exc.errors()]
        first = problems[0] if problems else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in first["loc"] if p not in ("body", "query", "path"))
        message = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'] if p not in ('body', 'query', 'path')) or 'body'}: {e['msg']}"
            for e in problems
        )
        return JSONResponse(ApiError(400, f"Invalid request: {message}", param=param or None).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        message = "Unknown route; see the OpenAI API reference for the paths" if exc.status_code == 404 else exc.detail
        return JSONResponse(ApiError(exc.status_code, str(message)).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        error = ApiError(500, "Internal error; the API's log has the details. Retry later", type="server_error")
        return JSONResponse(error.body(), status_code=500)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/files", openapi_extra=UPLOAD_BODY)
    async def upload(who: Project, request: Request) -> dict:
        # Read here rather than as UploadFile/Form parameters, which spool the whole body first.
        received: list[IncomingFile] = []

        def receive(filename: str, fields: dict[str, str]) -> FileSink:
            if fields.get("purpose", FINE_TUNE) != FINE_TUNE:
                # The SDK sends the purpose first: a wrong one keeps no byte. It is refused once the
                # body is read, as a client still sending may miss an earlier reply.
                return DROPPED
            received.append(engine.receive_file(who, filename))
            return received[-1]

        try:
            form = await read_form(request, "file", receive)
            refuse_purpose(form.fields.get("purpose", FINE_TUNE))
            missing = [
                name
                for name, absent in (("file", form.file is None), ("purpose", "purpose" not in form.fields))
                if absent
            ]
            if missing:
                message = "; ".join(f"{name}: Field required" for name in missing)
                raise ApiError(400, f"Invalid request: {message}", param=missing[0])
            return await run_in_threadpool(engine.finish_upload, received[0], form.fields["purpose"])
        finally:
            for incoming in received:
                incoming.discard()

    @app.get("/v1/files")
    def files(
        who: Project,
        purpose: str | None = None,
        after: str | None = None,
        limit: int | None = None,
        order: str = "desc",
    ) -> dict:
        return engine.list_files(who, purpose, after, limit, order)

    @app.api_route("/v1/files/{file_id}", methods=["GET", "DELETE"])
    def file(who: Project, file_id: str, request: Request) -> dict:
        return (engine.delete_file if request.method == "DELETE" else engine.file)(who, file_id)

    @app.get("/v1/files/{file_id}/content")
    def content(who: Project, file_id: str) -> FileResponse:
        path, filename = engine.file_content(who, file_id)
        return FileResponse(path, filename=filename, background=BackgroundTask(engine.remove_download, path))

    @app.post("/v1/fine_tuning/jobs")
    def create_job(who: Project, body: CreateJobRequest) -> dict:
        return engine.create_job(who, body)

    @app.get("/v1/fine_tuning/jobs")
    def jobs(who: Project, request: Request, after: str | None = None, limit: int | None = None) -> dict:
        # The SDK sends the metadata filter as metadata[key]=value.
        metadata = {k[9:-1]: v for k, v in request.query_params.items() if k.startswith("metadata[") and k[-1] == "]"}
        return engine.list_jobs(who, after, limit, metadata)

    @app.get("/v1/fine_tuning/jobs/{job_id}")
    def job(who: Project, job_id: str) -> dict:
        return engine.job(who, job_id)

    @app.post("/v1/fine_tuning/jobs/{job_id}/{action}")
    def act(who: Project, job_id: str, action: Literal["cancel", "pause", "resume"]) -> dict:
        return engine.job_action(who, job_id, action)

    @app.get("/v1/fine_tuning/jobs/{job_id}/events")
    def events(who: Project, job_id: str, after: str | None = None, limit: int | None = None) -> dict:
        return engine.events(who, job_id, after, limit)

    @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    def checkpoints(who: Project, job_id: str, after: str | None = None, limit: int | None = None) -> dict:
        return engine.checkpoints(who, job_id, after, limit)

    @app.get("/v1/models")
    def models(who: Project) -> dict:
        return engine.list_models(who)

    @app.api_route("/v1/models/{model_id:path}", methods=["GET", "DELETE"])
    def model(who: Project, model_id: str, request: Request) -> dict:
        return (engine.delete_model if request.method == "DELETE" else engine.model)(who, model_id)

    async def infer(who: Project, request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "The body must be a JSON object") from None
        if not isinstance(body, dict):
            raise ApiError(400, "The body must be a JSON object")
        status, media_type, content = await engine.forward(who, request.url.path, body)
        if isinstance(content, bytes):
            return Response(content, status_code=status, media_type=media_type)
        return StreamingResponse(content, status_code=status, media_type=media_type)

    for path in INFERENCE_ROUTES:
        app.add_api_route(path, infer, methods=["POST"])
    return app
