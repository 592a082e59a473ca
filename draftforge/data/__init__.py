"""Datasets for draft training: readers, regeneration by the target, chat-template loss masks,
tokenised cache, draft vocab."""

from draftforge.data.cache import TokenizedDataset, TokenizeSettings, cache_key, prepare_dataset
from draftforge.data.conversation import (
    FORMATS,
    ROLES,
    Conversation,
    Message,
    RowError,
    ToolCall,
)
from draftforge.data.prepare import PrepareResult, prepare
from draftforge.data.readers import Source, read_conversations
from draftforge.data.regenerate import (
    GenerationSettings,
    HFBackend,
    HTTPBackend,
    RegenerateResult,
    regenerate,
)
from draftforge.data.report import DataError, DataReport
from draftforge.data.template import ChatTemplate, load_template
from draftforge.data.vocab import (
    DraftVocab,
    build_draft_vocab,
    count_supervised,
    draft_vocab_from_counts,
    load_draft_vocab,
    save_draft_vocab,
)

__all__ = [
    "FORMATS",
    "ROLES",
    "ChatTemplate",
    "Conversation",
    "DataError",
    "DataReport",
    "DraftVocab",
    "GenerationSettings",
    "HFBackend",
    "HTTPBackend",
    "Message",
    "PrepareResult",
    "RegenerateResult",
    "RowError",
    "Source",
    "TokenizeSettings",
    "TokenizedDataset",
    "ToolCall",
    "build_draft_vocab",
    "cache_key",
    "count_supervised",
    "draft_vocab_from_counts",
    "load_draft_vocab",
    "load_template",
    "prepare",
    "prepare_dataset",
    "read_conversations",
    "regenerate",
    "save_draft_vocab",
]
