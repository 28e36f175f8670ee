"""`cfmc lsp` driven over stdio by pytest-lsp through one editing session on a real
SmolLM2 program (the standard library's smollm2, grown with block_expand)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import pytest_lsp
from lsprotocol import types
from pytest_lsp import ClientServerConfig, LanguageClient

PROGRAM = """import "std/smollm2.brick"

grow pro:
  method: block_expand
  from: smollm2
  every: 6

output: pro
"""


@pytest_lsp.fixture(config=ClientServerConfig(server_command=[sys.executable, "-m", "cfmlang", "lsp"]))
async def client(lsp_client: LanguageClient):
    await lsp_client.initialize_session(types.InitializeParams(capabilities=types.ClientCapabilities()))
    yield
    await lsp_client.shutdown_session()


def at(line: int, character: int) -> types.Position:
    return types.Position(line=line, character=character)


async def published(client: LanguageClient, uri: str) -> list[types.Diagnostic]:
    await client.wait_for_notification(types.TEXT_DOCUMENT_PUBLISH_DIAGNOSTICS)
    return list(client.diagnostics[uri])


def change(client: LanguageClient, uri: str, version: int, text: str) -> None:
    client.text_document_did_change(types.DidChangeTextDocumentParams(
        text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=version),
        content_changes=[types.TextDocumentContentChangeWholeDocument(text=text)]))


@pytest.mark.asyncio
async def test_session_on_smollm2(client: LanguageClient, tmp_path: Path):
    path = tmp_path / "grown.brick"
    path.write_text(PROGRAM)
    uri = path.as_uri()
    doc = types.TextDocumentIdentifier(uri=uri)
    client.text_document_did_open(types.DidOpenTextDocumentParams(
        text_document=types.TextDocumentItem(uri=uri, language_id="brick", version=1, text=PROGRAM)))
    assert await published(client, uri) == []

    # a misspelt reference: the diagnostic appears, with a quick fix to the declared name
    change(client, uri, 2, PROGRAM.replace("output: pro", "output: prp"))
    diagnostics = await published(client, uri)
    assert len(diagnostics) == 1 and diagnostics[0].range.start == at(7, 8)
    assert diagnostics[0].code.startswith("E") and "prp" in diagnostics[0].message
    actions = await client.text_document_code_action_async(types.CodeActionParams(
        text_document=doc, range=diagnostics[0].range, context=types.CodeActionContext(diagnostics=diagnostics)))
    [fix] = actions
    [edit] = fix.edit.changes[uri]
    assert edit.new_text == "pro" and edit.range == diagnostics[0].range
    # an unknown method: its own diagnostic; fixed, everything clears
    change(client, uri, 3, PROGRAM.replace("block_expand", "block_expnd"))
    diagnostics = await published(client, uri)
    assert [d.range.start for d in diagnostics] == [at(3, 10)]
    # a syntax error hides nothing else: the statement after it is checked (its unknown
    # method reported), and its reference to the broken `pro` is not an unknown name
    change(client, uri, 4, PROGRAM.replace("grow pro:", "grow pro") + "grow more:\n  method: block_expnd\n  from: pro\n")
    diagnostics = await published(client, uri)
    assert [(d.code, d.range.start) for d in diagnostics] == [("E002", at(2, 8)), ("E030", at(9, 10))]
    with pytest.raises(Exception, match="syntax errors"):   # the broken statement may use the name
        await client.text_document_rename_async(types.RenameParams(text_document=doc, position=at(8, 6),
                                                                   new_name="renamed"))
    change(client, uri, 5, PROGRAM)
    assert await published(client, uri) == []

    hover = await client.text_document_hover_async(types.HoverParams(text_document=doc, position=at(3, 12)))
    assert "LLaMA Pro" in hover.contents.value and "`every` (int or null" in hover.contents.value
    hover = await client.text_document_hover_async(types.HoverParams(text_document=doc, position=at(5, 3)))
    assert "`tolerance`" not in hover.contents.value and "`every` (int or null ≥ 1, `None`)" in hover.contents.value
    hover = await client.text_document_hover_async(types.HoverParams(text_document=doc, position=at(4, 10)))
    assert "llama, 30 layers, hidden 576" in hover.contents.value
    assert "tensors: 272" in hover.contents.value and "reads: nothing" in hover.contents.value
    hover = await client.text_document_hover_async(types.HoverParams(text_document=doc, position=at(2, 6)))
    assert "llama, 35 layers" in hover.contents.value and "reads: smollm2" in hover.contents.value

    def labels(completion) -> set[str]:
        return {i.label for i in completion.items}

    editing = PROGRAM.replace("  every: 6\n", "  every: 6\n  \n")
    change(client, uri, 6, editing)
    await published(client, uri)
    keys = await client.text_document_completion_async(types.CompletionParams(text_document=doc, position=at(6, 2)))
    assert {"every", "positions", "tolerance", "verify"} <= labels(keys)
    methods = await client.text_document_completion_async(types.CompletionParams(text_document=doc,
                                                                                 position=at(3, 10)))
    assert {"block_expand", "upcycle", "widen"} <= labels(methods) and "ties" not in labels(methods)
    names = await client.text_document_completion_async(types.CompletionParams(text_document=doc,
                                                                               position=at(4, 8)))
    assert labels(names) == {"pro", "smollm2"}
    imports = await client.text_document_completion_async(types.CompletionParams(text_document=doc,
                                                                                 position=at(0, 12)))
    assert "smollm2.brick" in labels(imports)
    change(client, uri, 7, PROGRAM)
    await published(client, uri)

    target = await client.text_document_definition_async(types.DefinitionParams(text_document=doc, position=at(4, 10)))
    assert target.uri.endswith("/std/smollm2.brick") and target.range.start == at(4, 6)
    refs = await client.text_document_references_async(types.ReferenceParams(
        text_document=doc, position=at(7, 9), context=types.ReferenceContext(include_declaration=True)))
    assert sorted((r.range.start.line, r.range.start.character) for r in refs) == [(2, 5), (7, 8)]
    renamed = await client.text_document_rename_async(types.RenameParams(text_document=doc, position=at(2, 6),
                                                                         new_name="pro_grown"))
    assert sorted((e.range.start.line, e.range.start.character, e.new_text) for e in renamed.changes[uri]) == \
        [(2, 5, "pro_grown"), (7, 8, "pro_grown")]
    symbols = await client.text_document_document_symbol_async(types.DocumentSymbolParams(text_document=doc))
    assert [(s.name, s.detail, s.selection_range.start) for s in symbols] == [("pro", "grow", at(2, 5))]

    # formatting: one edit replacing the document with cfmc fmt's layout; none once canonical
    formatting = types.DocumentFormattingParams(text_document=doc,
                                                options=types.FormattingOptions(tab_size=2, insert_spaces=True))
    assert not await client.text_document_formatting_async(formatting)
    change(client, uri, 8, PROGRAM.replace("  every: 6", "  every:    6     # one new block per six"))
    await published(client, uri)
    [edit] = await client.text_document_formatting_async(formatting)
    assert edit.range.start == at(0, 0)
    assert edit.new_text == PROGRAM.replace("  every: 6", "  every: 6  # one new block per six")
