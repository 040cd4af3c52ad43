package homeserver

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/asdispatch/asdispatch/registry"
)

// FuzzClientJSON throws arbitrary bodies at the endpoints that decode JSON:
// every answer is a Matrix JSON answer below 500, never a panic.
func FuzzClientJSON(f *testing.F) {
	as := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(404) }))
	defer as.Close()
	r, _, err := registry.Parse("bridge.yaml", []byte(fmt.Sprintf(bridgeReg, as.URL)))
	if err != nil {
		f.Fatal(err)
	}
	set, _, _ := registry.NewSet("hs", []*registry.Registration{r})
	srv, err := New(context.Background(), Config{ServerName: "hs", DataDir: f.TempDir(), Registry: registry.NewRegistry(set)})
	if err != nil {
		f.Fatal(err)
	}
	defer srv.Close(context.Background())
	paths := []string{"/register", "/login", "/createRoom", "/join/%23x:hs", "/rooms/!r:hs/invite",
		"/rooms/!r:hs/send/m.room.message/1", "/directory/room/%23a:hs", "/sendToDevice/m.x/1", "/rooms/!r:hs/typing/@br_a:hs"}
	for _, seed := range []string{`{}`, `{"username":"a","password":"b"}`, `{"room_alias_name":"br_x"}`, `[`, `{"messages":{"@a:hs":{"D":{}}}}`, `{"user_id":5}`} {
		f.Add(uint8(0), seed)
	}
	f.Fuzz(func(t *testing.T, which uint8, body string) {
		i := int(which) % len(paths)
		path := "/_matrix/client/v3" + paths[i]
		method := http.MethodPost
		if i >= 5 { // send, directory, sendToDevice, typing
			method = http.MethodPut
		}
		req := httptest.NewRequest(method, path, bytes.NewBufferString(body))
		req.Header.Set("Authorization", "Bearer as-bridge")
		rec := httptest.NewRecorder()
		srv.ServeHTTP(rec, req)
		if rec.Code >= 500 {
			t.Fatalf("%s %s with %q: %d %s", method, path, body, rec.Code, rec.Body.String())
		}
	})
}
