package main

import (
	"bytes"
	"strings"
	"testing"
)

func TestDemo(t *testing.T) {
	var out, errOut bytes.Buffer
	if code := run([]string{"demo"}, &out, &errOut); code != 0 {
		t.Fatalf("demo exited %d:\n%s\n%s", code, out.String(), errOut.String())
	}
	for _, want := range []string{
		"Created #logged_test:localhost",
		"[AS] Content: {\"body\":\"Hello, logging bot!\"",
		"the homeserver asks about #logged_test2:localhost",
		"The join succeeded",
		"Done: every message reached the logging AS",
	} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("demo output lacks %q:\n%s", want, out.String())
		}
	}
}
