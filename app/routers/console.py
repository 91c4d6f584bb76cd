"""The web console under /ui (not part of the API's contract, so not in its OpenAPI document).

Pages are shells with no data, which any browser may load; their data comes from /ui/fragments/..., server-rendered
HTML that the page's script fetches with the bearer token the user gave (kept in sessionStorage, sent as a header:
no cookie, so no cross-site request can use it). With auth off the same requests carry no token. One design for
both: what a token may read through the API is what its fragments show, and nothing without one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from app.deps import PageToken, Reader, SessionDep, SettingsDep, StoreDep
from app.services import console

HERE = Path(__file__).resolve().parent.parent
templates = Jinja2Templates(directory=HERE / "templates" / "console")
templates.env.trim_blocks = templates.env.lstrip_blocks = True  # no blank lines per loop turn (1,000 chart points)
templates.env.filters.update(params=console.human_params, duration=console.duration, when=console.when)
static = StaticFiles(directory=HERE / "static" / "console")
router = APIRouter(prefix="/ui", include_in_schema=False)
# ids as the registry makes them: a page puts its id into the URL its script fetches, so nothing else may pass
Id = Annotated[str, PathParam(max_length=40, pattern=r"^[A-Za-z0-9_]+$")]

# the pages' own policy: scripts, styles and requests of this origin only; no framing; no referrer (a signed link
# in a URL goes nowhere else)
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; "
                                           "base-uri 'none'; form-action 'self'",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
FRAGMENT_HEADERS = {**PAGE_HEADERS, "Cache-Control": "no-store"}  # data read with a token: never cached


def page(request: Request, title: str, fragment: str) -> HTMLResponse:
    return templates.TemplateResponse(request, "page.html", {
        "title": title, "fragment": fragment, "auth": request.app.state.settings.auth_enabled}, headers=PAGE_HEADERS)


def fragment(request: Request, name: str, **context: object) -> HTMLResponse:
    return templates.TemplateResponse(request, name, context, headers=FRAGMENT_HEADERS)


def listing(path: str, page_token: str | None) -> str:
    return f"{path}?{urlencode({'page_token': page_token})}" if page_token else path


@router.get("/", response_class=RedirectResponse)
def slash() -> RedirectResponse:
    return RedirectResponse("/ui", status_code=308)


@router.get("", response_class=HTMLResponse)
def chains_page(request: Request, page_token: PageToken = None) -> HTMLResponse:
    return page(request, "Chains", listing("/ui/fragments/chains", page_token))


@router.get("/chains/{chain_id}", response_class=HTMLResponse)
def chain_page(request: Request, chain_id: Id) -> HTMLResponse:
    return page(request, f"Chain {chain_id}", f"/ui/fragments/chains/{chain_id}")


@router.get("/jobs", response_class=HTMLResponse)
def jobs_page(request: Request, page_token: PageToken = None) -> HTMLResponse:
    return page(request, "Jobs", listing("/ui/fragments/jobs", page_token))


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(request: Request, job_id: Id) -> HTMLResponse:
    return page(request, f"Job {job_id}", f"/ui/fragments/jobs/{job_id}")


@router.get("/models/{model_id}", response_class=HTMLResponse)
def model_page(request: Request, model_id: Id) -> HTMLResponse:
    return page(request, f"Model {model_id}", f"/ui/fragments/models/{model_id}")


@router.get("/fragments/chains", response_class=HTMLResponse)
def chains_fragment(request: Request, session: SessionDep, principal: Reader,
                    page_token: PageToken = None) -> HTMLResponse:
    rows, token = console.chains_page(session, page_token)
    return fragment(request, "chains.html", rows=rows, next_page_token=token)


@router.get("/fragments/chains/{chain_id}", response_class=HTMLResponse)
def chain_fragment(request: Request, chain_id: Id, session: SessionDep, store: StoreDep,
                   principal: Reader) -> HTMLResponse:
    return fragment(request, "chain.html", view=console.chain_view(session, store, chain_id),
                    can_build=principal.has("build"))


@router.get("/fragments/jobs", response_class=HTMLResponse)
def jobs_fragment(request: Request, session: SessionDep, principal: Reader,
                  page_token: PageToken = None) -> HTMLResponse:
    rows, token = console.jobs_page(session, principal, page_token)
    return fragment(request, "jobs.html", rows=rows, next_page_token=token)


@router.get("/fragments/jobs/{job_id}", response_class=HTMLResponse)
def job_fragment(request: Request, job_id: Id, session: SessionDep, principal: Reader) -> HTMLResponse:
    return fragment(request, "job.html", view=console.job_page(session, principal, job_id))


@router.get("/fragments/models/{model_id}", response_class=HTMLResponse)
def model_fragment(request: Request, model_id: Id, session: SessionDep, settings: SettingsDep,
                   principal: Reader) -> HTMLResponse:
    view = console.model_view(session, settings, request.app.state.link_key, principal, model_id)
    return fragment(request, "model.html", view=view, base=str(request.base_url).rstrip("/"),
                    auth=settings.auth_enabled)
