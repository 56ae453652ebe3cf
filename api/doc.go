// Package api is the contract of a Tandem node's HTTP API: the JSON of
// GET /status (Status and its parts, whose JSON names are part of the
// command-line and tooling contract and must not change), the bodies of
// the control endpoints, the error codes the server sends, and a typed
// Client for all of them.
//
// The package depends on the standard library only, so tools outside
// Tandem can use the client.
package api
