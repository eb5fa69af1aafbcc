"""The rerank wire format that vLLM, llama-server, Jina and Cohere share (POST /v1/rerank, /rerank, /v2/rerank),
modelled once: a query, documents as strings or `{"text": ...}` objects; the answer's results sorted by relevance.

Requests forbid unknown fields (a 400 naming them). The documents are bounded by LLM_MAX_RERANK_DOCUMENTS, and the
text the model reads (the query once per document, plus the documents) by LLM_MAX_PROMPT_CHARS.
"""

from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import BaseModel, Discriminator, Field, Tag, model_validator

from gateway.core.request import LIMITS, Capped, ModelRequest, Request
from gateway.errors import invalid_param

Text = Annotated[str, Field(min_length=1)]


class DocumentText(Request):
    """A document as an object: in a request, and in a result that returns its document."""

    text: Text


# A string or an object, told apart before validation: an error names what is wrong with the form sent.
Document = Annotated[
    Annotated[Text, Tag("str")] | Annotated[DocumentText, Tag("DocumentText")],
    Discriminator(lambda value: "str" if isinstance(value, str) else "DocumentText"),
]


class RerankRequest(ModelRequest):
    endpoint: ClassVar[str] = "rerank"

    query: Text
    documents: Annotated[list[Document], Field(min_length=1), Capped("rerank_documents")]
    top_n: int | None = Field(None, ge=1)  # the best so many; all when left out (or more than there are)
    return_documents: bool = True  # as vLLM and Jina answer (Cohere's v1 default is false)
    # Providers truncate each document to so many tokens; local engines do not (`unsupported_locally`).
    max_tokens_per_doc: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _pairs_within_limit(self):
        texts = self.texts()
        # Each pair is read whole: the query again with every document. Checked here, not in `check_size`, as a
        # short body can repeat a long query many times.
        chars = len(self.query) * len(texts) + sum(map(len, texts))
        if chars > LIMITS.prompt_chars:
            raise invalid_param("documents", f"The query read with each document makes {chars} characters; at most "
                                f"{LIMITS.prompt_chars} are allowed.")  # fmt: skip
        return self

    def texts(self) -> list[str]:
        return [document if isinstance(document, str) else document.text for document in self.documents]

    def unsupported_locally(self) -> str | None:
        return None if self.max_tokens_per_doc is None else "max_tokens_per_doc"


class RerankResult(BaseModel):
    index: int  # the document's place in the request
    relevance_score: float
    document: DocumentText | None = Field(None, exclude_if=lambda value: value is None)


class RerankUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class RerankResponse(BaseModel):
    id: str
    model: str
    results: list[RerankResult]  # the most relevant first
    usage: RerankUsage


# Its schema holds a limit (`Capped`): rebuilt once the settings' limits are applied.
LIMITED_MODELS = (RerankRequest,)
