package asapi

import (
	"context"
	"errors"
	"testing"
)

// Without a socket, a `url: null` target is ErrNoURL and a socket-only one
// ErrNotConnected (a connection failure: the sender backs off and keeps
// the backlog).
func TestNoSocket(t *testing.T) {
	c := New(Options{})
	for _, tc := range []struct {
		url  string
		want error
	}{
		{"", ErrNoURL},
		{SocketURL, ErrNotConnected},
	} {
		err := c.PutTransaction(context.Background(), Target{ID: "a", URL: tc.url}, "1", []byte(`{"events":[]}`))
		if !errors.Is(err, tc.want) {
			t.Errorf("url %q: %v, want %v", tc.url, err, tc.want)
		}
		if tc.want == ErrNotConnected && !errors.Is(err, ErrConnection) {
			t.Errorf("ErrNotConnected is not an ErrConnection: %v", err)
		}
	}
	if c.Connected("a") || c.HasSockets() {
		t.Error("a client without Sockets reports a socket")
	}
}
