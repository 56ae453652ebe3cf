package api

import (
	"errors"
	"net/http"
)

// Code is the machine-readable kind of an API error: the server sends it
// beside the message, {"error": "...", "code": "..."}, and the client
// turns it back into the sentinel error of that kind.
type Code string

const (
	// CodeBadRequest: the request's body or parameters are wrong.
	CodeBadRequest Code = "bad_request"
	// CodeNotPrimary: asked of a node that is not the primary (or not a
	// primary any more: fenced).
	CodeNotPrimary Code = "not_primary"
	// CodeNotProtected: the secondary holds no current image to hand to.
	CodeNotProtected Code = "not_protected"
	// CodeBusy: another operation (a migration, a switchover) is under
	// way, or there is none to act on now.
	CodeBusy Code = "busy"
	// CodeRefused: the node refuses for safety (the primary is still
	// heard, the source contradicts the request, a protected guest asked
	// to migrate, ...); the message says why and what would override it.
	CodeRefused Code = "refused"
	// CodeForbidden: the node was not started to allow this.
	CodeForbidden Code = "forbidden"
	// CodeInternal: the operation failed on the node.
	CodeInternal Code = "internal"
)

// The sentinel of each code: errors.Is(err, api.ErrNotPrimary) holds for
// an error the server sent with code not_primary.
var (
	ErrBadRequest   = errors.New("bad request")
	ErrNotPrimary   = errors.New("not the primary")
	ErrNotProtected = errors.New("not protected")
	ErrBusy         = errors.New("busy")
	ErrRefused      = errors.New("refused")
	ErrForbidden    = errors.New("forbidden")
	ErrInternal     = errors.New("internal error")
)

var sentinels = map[Code]error{
	CodeBadRequest:   ErrBadRequest,
	CodeNotPrimary:   ErrNotPrimary,
	CodeNotProtected: ErrNotProtected,
	CodeBusy:         ErrBusy,
	CodeRefused:      ErrRefused,
	CodeForbidden:    ErrForbidden,
	CodeInternal:     ErrInternal,
}

// ErrorBody is the JSON of every error answer.
type ErrorBody struct {
	Error string `json:"error"`
	Code  Code   `json:"code,omitempty"`
}

// Error is an error answer of a node's API. Its text is the server's
// message alone; errors.Is matches the sentinel of its code.
type Error struct {
	HTTPStatus int
	Code       Code // "" when the server sent none (an older node) or a code this client does not know
	Message    string
}

func (e *Error) Error() string { return e.Message }

// Is reports whether target is the sentinel of e's code.
func (e *Error) Is(target error) bool {
	s, ok := sentinels[e.Code]
	return ok && s == target
}

// Unwrap returns the sentinel of e's code (nil for none).
func (e *Error) Unwrap() error { return sentinels[e.Code] }

// DefaultCode is the code of an HTTP status when the server gives none.
func DefaultCode(httpStatus int) Code {
	switch {
	case httpStatus == http.StatusBadRequest:
		return CodeBadRequest
	case httpStatus == http.StatusForbidden:
		return CodeForbidden
	case httpStatus == http.StatusConflict:
		return CodeRefused
	case httpStatus >= 500:
		return CodeInternal
	}
	return ""
}
