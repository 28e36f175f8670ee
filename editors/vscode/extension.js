// The VS Code client: starts `cfmc lsp` (the `cfmlang.server.command` setting) over stdio
// for .brick files.
"use strict";
const vscode = require("vscode");
const { LanguageClient } = require("vscode-languageclient/node");

let client;

function activate(context) {
  const [command, ...args] = vscode.workspace.getConfiguration("cfmlang").get("server.command");
  const server = { command, args };
  client = new LanguageClient("cfmlang", "cfmlang language server", server, {
    documentSelector: [{ scheme: "file", language: "brick" }],
  });
  context.subscriptions.push(client);
  return client.start();
}

function deactivate() {
  return client ? client.stop() : undefined;
}

module.exports = { activate, deactivate };
