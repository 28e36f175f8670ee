"""The server wiring: document events re-analyse (debounced) and publish diagnostics; the
other requests answer from the latest analysis of the document."""
from __future__ import annotations

import asyncio

from lsprotocol import types
from pygls.exceptions import JsonRpcInvalidParams
from pygls.lsp.server import LanguageServer

from cfmlang.lsp.actions import for_file, quick_fixes
from cfmlang.lsp.analysis import Analysis, analyze
from cfmlang.lsp.completion import complete
from cfmlang.lsp.formatting import formatting_edits
from cfmlang.lsp.hover import hover
from cfmlang.lsp.navigation import RenameRefused, definition, document_symbols, references, rename
from cfmlang.lsp.positions import uri_to_path
from cfmlang.version import __version__

DEBOUNCE_S = 0.02
"""Changes closer together than this are analysed once."""


class BrickServer(LanguageServer):
    def __init__(self):
        super().__init__("cfmc-lsp", __version__)
        self.analyses: dict[str, Analysis] = {}
        self.pending: dict[str, asyncio.Task] = {}

    def analysis(self, uri: str) -> Analysis:
        """The analysis of the document's current text (made now if a change is pending)."""
        text = self.workspace.get_text_document(uri).source
        known = self.analyses.get(uri)
        if known is None or known.text != text:
            known = self.publish(uri)
        return known

    def publish(self, uri: str) -> Analysis:
        document = self.workspace.get_text_document(uri)
        path = uri_to_path(uri)
        result = analyze(document.source, path)
        self.analyses[uri] = result
        self.text_document_publish_diagnostics(types.PublishDiagnosticsParams(
            uri=uri, version=document.version, diagnostics=for_file(result.diagnostics, path)))
        return result

    def schedule(self, uri: str) -> None:
        previous = self.pending.pop(uri, None)
        if previous is not None:
            previous.cancel()
        self.pending[uri] = asyncio.get_running_loop().create_task(self._later(uri))

    async def _later(self, uri: str) -> None:
        await asyncio.sleep(DEBOUNCE_S)
        self.pending.pop(uri, None)
        self.publish(uri)


def build_server() -> BrickServer:
    server = BrickServer()

    @server.feature(types.TEXT_DOCUMENT_DID_OPEN)
    def did_open(ls: BrickServer, params: types.DidOpenTextDocumentParams):
        ls.publish(params.text_document.uri)

    @server.feature(types.TEXT_DOCUMENT_DID_CHANGE)
    async def did_change(ls: BrickServer, params: types.DidChangeTextDocumentParams):
        ls.schedule(params.text_document.uri)

    @server.feature(types.TEXT_DOCUMENT_DID_SAVE)
    def did_save(ls: BrickServer, params: types.DidSaveTextDocumentParams):
        ls.publish(params.text_document.uri)

    @server.feature(types.TEXT_DOCUMENT_DID_CLOSE)
    def did_close(ls: BrickServer, params: types.DidCloseTextDocumentParams):
        ls.analyses.pop(params.text_document.uri, None)
        ls.text_document_publish_diagnostics(types.PublishDiagnosticsParams(uri=params.text_document.uri,
                                                                            diagnostics=[]))

    @server.feature(types.TEXT_DOCUMENT_HOVER)
    def on_hover(ls: BrickServer, params: types.HoverParams):
        return hover(ls.analysis(params.text_document.uri), params.position)

    @server.feature(types.TEXT_DOCUMENT_COMPLETION,
                    types.CompletionOptions(trigger_characters=[":", " ", '"', "/", "{", ","]))
    def on_completion(ls: BrickServer, params: types.CompletionParams):
        uri = params.text_document.uri
        text = ls.workspace.get_text_document(uri).source
        return types.CompletionList(is_incomplete=False, items=complete(ls.analysis(uri), text, params.position))

    @server.feature(types.TEXT_DOCUMENT_DEFINITION)
    def on_definition(ls: BrickServer, params: types.DefinitionParams):
        return definition(ls.analysis(params.text_document.uri), params.position)

    @server.feature(types.TEXT_DOCUMENT_REFERENCES)
    def on_references(ls: BrickServer, params: types.ReferenceParams):
        return references(ls.analysis(params.text_document.uri), params.position,
                          params.context.include_declaration)

    @server.feature(types.TEXT_DOCUMENT_RENAME)
    def on_rename(ls: BrickServer, params: types.RenameParams):
        try:
            return rename(ls.analysis(params.text_document.uri), params.position, params.new_name)
        except RenameRefused as exc:
            raise JsonRpcInvalidParams(str(exc)) from None

    @server.feature(types.TEXT_DOCUMENT_DOCUMENT_SYMBOL)
    def on_symbols(ls: BrickServer, params: types.DocumentSymbolParams):
        return document_symbols(ls.analysis(params.text_document.uri))

    @server.feature(types.TEXT_DOCUMENT_FORMATTING)
    def on_formatting(ls: BrickServer, params: types.DocumentFormattingParams):
        return formatting_edits(ls.analysis(params.text_document.uri))

    @server.feature(types.TEXT_DOCUMENT_CODE_ACTION,
                    types.CodeActionOptions(code_action_kinds=[types.CodeActionKind.QuickFix]))
    def on_code_action(ls: BrickServer, params: types.CodeActionParams):
        return quick_fixes(params.text_document.uri, params.context.diagnostics)

    return server


def serve_stdio() -> None:
    build_server().start_io()
