package homeserver

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/asdispatch/asdispatch/queue"
	"github.com/asdispatch/asdispatch/registry"
)

func TestMedia(t *testing.T) {
	e := start(t, t.TempDir(), notFoundAS())
	e.srv.cfg.MaxUploadBytes = 1000
	alice, bob := e.register("alice"), e.register("bob")
	status, out := e.raw("POST", "/_matrix/media/v3/upload?filename=cat.png", alice, []byte("PNGDATA"), "Content-Type", "image/png")
	var up map[string]string
	json.Unmarshal(out, &up)
	if status != 200 || !strings.HasPrefix(up["content_uri"], "mxc://hs/") {
		t.Fatalf("upload %d %s", status, out)
	}
	id := strings.TrimPrefix(up["content_uri"], "mxc://hs/")
	for _, path := range []string{"/_matrix/client/v1/media/download/hs/" + id, "/_matrix/client/v1/media/download/hs/" + id + "/other.png",
		"/_matrix/client/v1/media/thumbnail/hs/" + id + "?width=32&height=32", "/_matrix/media/v3/download/hs/" + id} {
		req, _ := http.NewRequest("GET", e.hs.URL+path, nil)
		if strings.HasPrefix(path, "/_matrix/client") {
			req.Header.Set("Authorization", "Bearer "+bob)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		var body bytes.Buffer
		body.ReadFrom(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || body.String() != "PNGDATA" || resp.Header.Get("Content-Type") != "image/png" || !strings.Contains(resp.Header.Get("Content-Disposition"), "inline") {
			t.Errorf("%s: %d %q %v", path, resp.StatusCode, body.String(), resp.Header)
		}
	}
	var created map[string]any
	e.get("POST", "/_matrix/media/v1/create", alice, nil, &created)
	mxc, _ := created["content_uri"].(string)
	cid := strings.TrimPrefix(mxc, "mxc://hs/")
	e.run(t, []call{
		{"authenticated download without a token", "GET", "/_matrix/client/v1/media/download/hs/" + id, "", nil, 401, "M_MISSING_TOKEN"},
		{"remote media", "GET", "/_matrix/client/v1/media/download/elsewhere/" + id, bob, nil, 404, "M_NOT_FOUND"},
		{"unknown media", "GET", "/_matrix/client/v1/media/download/hs/nope", bob, nil, 404, "M_NOT_FOUND"},
		{"a path as media ID", "GET", "/_matrix/media/v3/download/hs/..%2Fhomeserver.db", "", nil, 404, "M_NOT_FOUND"},
		{"too large", "POST", "/_matrix/media/v3/upload", alice, bytes.Repeat([]byte("x"), 1001), 413, "M_TOO_LARGE"},
		{"not uploaded yet", "GET", "/_matrix/client/v1/media/download/hs/" + cid, bob, nil, 504, "M_NOT_YET_UPLOADED"},
		{"upload to another's reservation", "PUT", "/_matrix/media/v3/upload/hs/" + cid, bob, []byte("x"), 403, "M_FORBIDDEN"},
		{"upload to the reservation", "PUT", "/_matrix/media/v3/upload/hs/" + cid, alice, []byte("later"), 200, ""},
		{"upload twice", "PUT", "/_matrix/media/v3/upload/hs/" + cid, alice, []byte("again"), 409, "M_CANNOT_OVERWRITE_MEDIA"},
		{"download the reservation", "GET", "/_matrix/client/v1/media/download/hs/" + cid, bob, nil, 200, ""},
		{"media config", "GET", "/_matrix/client/v1/media/config", bob, nil, 200, ""},
	})
	var cfg map[string]any
	e.get("GET", "/_matrix/client/v1/media/config", bob, nil, &cfg)
	if cfg["m.upload.size"] != float64(1000) {
		t.Errorf("media config %v", cfg)
	}
}

// TestThirdParty: the client endpoints ask the ASes that list the
// protocol, forwarding only the protocol's fields.
func TestThirdParty(t *testing.T) {
	seen := make(chan string, 10)
	as := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case strings.HasSuffix(r.URL.Path, "/thirdparty/protocol/irc"):
			fmt.Fprint(w, `{"user_fields":["nick"],"location_fields":["channel"],"icon":"mxc://x/y","field_types":{},"instances":[{"network_id":"libera","desc":"Libera","fields":{}}]}`)
		case strings.Contains(r.URL.Path, "/thirdparty/user"):
			seen <- r.URL.RawQuery
			fmt.Fprint(w, `[{"userid":"@br_nick:hs","protocol":"irc","fields":{"nick":"nick"}}]`)
		case strings.Contains(r.URL.Path, "/thirdparty/location"):
			seen <- r.URL.RawQuery
			fmt.Fprint(w, `[{"alias":"#br_chan:hs","protocol":"irc","fields":{"channel":"#chan"}}]`)
		default:
			w.WriteHeader(404)
		}
	}))
	defer as.Close()
	reg, _, err := registry.Parse("b.yaml", []byte(fmt.Sprintf(bridgeReg+"protocols: [irc]\n", as.URL)))
	if err != nil {
		t.Fatal(err)
	}
	set, _, _ := registry.NewSet("hs", []*registry.Registration{reg})
	srv, err := New(context.Background(), Config{ServerName: "hs", DataDir: t.TempDir(), Registry: registry.NewRegistry(set), Password: cheapPasswords,
		Queue: queue.Options{RetryInitial: 10 * time.Millisecond, RetryMax: 50 * time.Millisecond}})
	if err != nil {
		t.Fatal(err)
	}
	e := &env{t: t, srv: srv, hs: httptest.NewServer(srv)}
	t.Cleanup(e.stop)
	tok := e.register("alice")
	tp := "/_matrix/client/v3/thirdparty/"
	e.run(t, []call{
		{"protocols", "GET", tp + "protocols", tok, nil, 200, ""},
		{"protocol", "GET", tp + "protocol/irc", tok, nil, 200, ""},
		{"unknown protocol", "GET", tp + "protocol/xmpp", tok, nil, 404, "M_NOT_FOUND"},
		{"user by id without userid", "GET", tp + "user", tok, nil, 400, "M_MISSING_PARAM"},
		{"location by alias without alias", "GET", tp + "location", tok, nil, 400, "M_MISSING_PARAM"},
		{"without a token", "GET", tp + "protocols", "", nil, 401, "M_MISSING_TOKEN"},
	})
	var protos map[string]map[string]any
	e.get("GET", tp+"protocols", tok, nil, &protos)
	if inst := protos["irc"]["instances"].([]any); len(inst) != 1 || inst[0].(map[string]any)["instance_id"] != "bridge|libera" {
		t.Errorf("protocols %v", protos)
	}
	var users []map[string]any
	e.get("GET", tp+"user/irc?nick=nick&access_token="+tok+"&other=1", "", nil, &users)
	if len(users) != 1 || users[0]["userid"] != "@br_nick:hs" {
		t.Errorf("users %v", users)
	}
	if q := <-seen; q != "nick=nick" {
		t.Errorf("forwarded query %q, want only the protocol's fields", q)
	}
	var locs []map[string]any
	e.get("GET", tp+"location?alias="+"%23br_chan:hs", tok, nil, &locs)
	if len(locs) != 1 {
		t.Errorf("locations %v", locs)
	}
	<-seen
	e.get("GET", tp+"user?userid=%40br_nick:hs", tok, nil, &users)
	if len(users) != 1 {
		t.Errorf("users by id %v", users)
	}
}
