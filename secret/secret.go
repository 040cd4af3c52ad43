// Package secret holds tokens (as_token, hs_token, access tokens) so that they
// cannot leak by accident: every way Go and zap have of printing a value prints
// a placeholder, and comparison runs in constant time.
package secret

import (
	"crypto/subtle"

	"go.uber.org/zap/zapcore"
)

// Redacted is what a Token prints as.
const Redacted = "[REDACTED]"

// Token is a secret string. The zero value is the empty token.
type Token struct{ v string }

// New wraps s.
func New(s string) Token { return Token{v: s} }

// Reveal returns the secret itself. Call it only where the token goes on the
// wire (an Authorization header) or into a constant-time comparison.
func (t Token) Reveal() string { return t.v }

// IsZero reports whether the token is empty.
func (t Token) IsZero() bool { return t.v == "" }

// Equal compares t with s in time that depends only on their lengths.
func (t Token) Equal(s string) bool {
	return subtle.ConstantTimeCompare([]byte(t.v), []byte(s)) == 1
}

// String implements fmt.Stringer.
func (t Token) String() string { return Redacted }

// GoString implements fmt.GoStringer, so %#v does not leak either.
func (t Token) GoString() string { return Redacted }

// MarshalText implements encoding.TextMarshaler (JSON, YAML, zap reflection).
func (t Token) MarshalText() ([]byte, error) { return []byte(Redacted), nil }

// MarshalLogObject lets zap.Object log a Token as a placeholder.
func (t Token) MarshalLogObject(enc zapcore.ObjectEncoder) error {
	enc.AddString("token", Redacted)
	return nil
}
