package bench

import (
	"bytes"
	"io"
	"testing"
)

// TestReadBody checks that bodies read into pooled buffers are whole,
// whether the buffer fits, is reused or must grow (no Content-Length).
func TestReadBody(t *testing.T) {
	cases := []struct {
		name string
		size int
		cl   int64 // Content-Length as the request has it (-1: unknown)
	}{
		{"empty", 0, 0},
		{"small", 10, 10},
		{"exact pool size", 64 << 10, 64 << 10},
		{"large", 4<<20 + 3, 4<<20 + 3},
		{"unknown length, large", 300<<10 + 1, -1},
		{"small after large", 7, 7},
	}
	a := &asServer{}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			want := bytes.Repeat([]byte("0123456789abcdef"), c.size/16+1)[:c.size]
			// A reader that hands out few bytes at a time, as a socket does.
			buf := a.readBody(io.LimitReader(&slowReader{b: want}, int64(c.size)), c.cl)
			got := buf.Bytes()
			if !bytes.Equal(got, want) {
				t.Fatalf("read %d bytes, want %d (equal: %v)", len(got), len(want), bytes.Equal(got, want))
			}
			a.bodies.Put(buf)
		})
	}
}

type slowReader struct{ b []byte }

func (r *slowReader) Read(p []byte) (int, error) {
	if len(r.b) == 0 {
		return 0, io.EOF
	}
	n := copy(p[:min(len(p), 1500)], r.b)
	r.b = r.b[n:]
	return n, nil
}
