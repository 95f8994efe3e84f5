"""``melanoma app``: one web page to try a logged model on a photo.

Drop or choose a JPEG/PNG; the page shows the malignant probability, the label at the model's
operating threshold in words, the Grad-CAM overlay on the photo and the model card. It scores
through the same pyfunc that ``mlflow models serve`` serves, so what the page says is what the
server says. A plain Starlette app (MLflow already installs Starlette and uvicorn).
"""

from __future__ import annotations

import base64
import html
import logging
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse
from starlette.routing import Route

from melanoma.classifier.pyfunc import OUT_OF_SCOPE, SCOPE_ABSENT, file_problem

log = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("app.html")
MAX_UPLOAD_BYTES = 30_000_000


class TriedModel:
    """A logged model loaded once, with what the page says about it."""

    def __init__(self, model_uri: str):
        self.uri = model_uri
        self.pyfunc = mlflow.pyfunc.load_model(model_uri)
        model = self.pyfunc.unwrap_python_model().model
        self.threshold, self.rule = model.threshold, model.rule
        self.site = model.settings.get("site")  # a site version (melanoma adapt): its name, date and threshold's origin
        self.card_html = model_card_html(model_uri)

    def version_in_words(self) -> str:
        if not self.site:
            return "the model as trained (no site adaptation)"
        return (f"the version adapted to site {self.site['name']} on {self.site['date']} "
                f"({self.site['photos']} photos; threshold: {self.site['threshold_reason']})")

    def decision_in_words(self, probability: float, label: str) -> str:
        side = "above" if probability >= self.threshold else "below"
        return (f"Malignant probability {probability:.1%}: {side} the operating threshold "
                f"{self.threshold:.1%}, the threshold {self.rule.in_words()}. Label: {label}.")

    @staticmethod
    def scope_in_words(check: str) -> str:
        """What the in-scope check says of the photo, for a person."""
        if check == OUT_OF_SCOPE:
            return ("This does not look like a dermoscopy photo like the ones the model was trained on: its answer "
                    "and every figure on the model card do not apply to it. Take a dermoscopy photo of one lesion.")
        if check == SCOPE_ABSENT:
            return "This model has no in-scope check: it cannot tell whether a photo is one it was made for."
        return ("In scope: nothing sets this photo apart from the model's dermoscopy training photos. The check does "
                "not tell a photo taken without a dermoscope from one taken with it: the answer holds for dermoscopy "
                "photos only.")

    def score(self, image: bytes) -> dict:
        """The served model's answer for one image file, with the overlay; ValueError names what
        is wrong with a file it cannot score."""
        frame = pd.DataFrame({"image": [base64.b64encode(image).decode("ascii")]})
        try:
            row = self.pyfunc.predict(frame, params={"explain": True}).iloc[0]
        except MlflowException as exc:
            raise ValueError(file_problem(exc)) from exc
        probability = float(row["malignant_probability"])
        return {"malignant_probability": probability, "label": row["label"], "threshold": self.threshold,
                "in_words": self.decision_in_words(probability, row["label"]), "overlay_png": row["gradcam_png"],
                "in_scope": None if row["in_scope"] is None else bool(row["in_scope"]), "scope_check": row["scope_check"],
                "scope_in_words": self.scope_in_words(row["scope_check"])}


def model_card_html(model_uri: str) -> str:
    """The card logged with the model's training run, or a line saying there is none."""
    from melanoma.card import CARD_HTML_FILE, run_id_of

    try:
        return mlflow.artifacts.load_text(f"runs:/{run_id_of(model_uri)}/{CARD_HTML_FILE}")
    except Exception as exc:  # a model logged outside a training run, or a store without the file
        log.warning("no model card for %s: %s", model_uri, exc)
        return f"<p>No model card was logged with {model_uri}.</p>"


def create_app(model: TriedModel) -> Starlette:
    async def page(request: Request) -> HTMLResponse:
        page = PAGE.read_text().replace("{{model_uri}}", html.escape(model.uri))
        return HTMLResponse(page.replace("{{version}}", html.escape(model.version_in_words())))

    async def card(request: Request) -> HTMLResponse:
        return HTMLResponse(model.card_html)

    async def predict(request: Request) -> JSONResponse:
        if int(request.headers.get("content-length") or 0) > MAX_UPLOAD_BYTES:
            return JSONResponse({"error": f"file too large: at most {MAX_UPLOAD_BYTES // 1_000_000} MB"}, 413)
        try:
            image = base64.b64decode((await request.json())["image"], validate=True)
        except (ValueError, KeyError, TypeError):  # bad JSON, no "image", or not base64
            return JSONResponse({"error": 'the request needs JSON {"image": "<base64 of a JPEG or PNG>"}'}, 400)
        try:
            return JSONResponse(model.score(image))
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, 400)
        except Exception:
            log.exception("scoring failed")
            return JSONResponse({"error": "the model could not score this file (the server log has the details)"},
                                500)

    async def ping(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    return Starlette(routes=[Route("/", page), Route("/card", card), Route("/ping", ping),
                             Route("/predict", predict, methods=["POST"])])


def serve_app(model_uri: str, host: str = "127.0.0.1", port: int = 5002) -> None:
    import uvicorn

    app = create_app(TriedModel(model_uri))
    log.info("trying %s at http://%s:%d/", model_uri, host, port)
    uvicorn.run(app, host=host, port=port, log_level="warning")
