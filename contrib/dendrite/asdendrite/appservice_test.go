package asdendrite

import (
	"context"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	appserviceAPI "github.com/matrix-org/dendrite/appservice/api"

	"github.com/asdispatch/asdispatch/queries"
	"github.com/asdispatch/asdispatch/registry"
)

// fakeAS answers user and alias queries (yes for names starting "yes") and
// the third-party lookups of protocol "irc".
func fakeAS(t *testing.T) *httptest.Server {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "Bearer hs-irc" {
			w.WriteHeader(403)
			return
		}
		p := r.URL.Path
		switch {
		case strings.HasPrefix(p, "/_matrix/app/v1/users/@irc_yes"), strings.HasPrefix(p, "/_matrix/app/v1/rooms/#irc_yes"):
			w.Write([]byte("{}"))
		case p == "/_matrix/app/v1/thirdparty/protocol/irc":
			w.Write([]byte(`{"user_fields":["network","nickname"],"location_fields":["network","channel"],"icon":"mxc://x/y",
				"field_types":{"network":{"regexp":".*","placeholder":"libera"}},"instances":[{"desc":"Libera","network_id":"libera","fields":{"network":"libera"}}]}`))
		case p == "/_matrix/app/v1/thirdparty/user/irc" && r.URL.Query().Get("nickname") == "bob":
			w.Write([]byte(`[{"userid":"@irc_bob:example.org","protocol":"irc","fields":{"nickname":"bob"}}]`))
		case p == "/_matrix/app/v1/thirdparty/user" && r.URL.Query().Get("userid") == "@irc_bob:example.org":
			w.Write([]byte(`[{"userid":"@irc_bob:example.org","protocol":"irc","fields":{"nickname":"bob"}}]`))
		case p == "/_matrix/app/v1/thirdparty/location" && r.URL.Query().Get("alias") == "#irc_chan:example.org":
			w.Write([]byte(`[{"alias":"#irc_chan:example.org","protocol":"irc","fields":{"channel":"#chan"}}]`))
		default:
			w.WriteHeader(404)
			w.Write([]byte(`{"errcode":"M_NOT_FOUND"}`))
		}
	}))
	t.Cleanup(srv.Close)
	return srv
}

func writeReg(t *testing.T, dir, name, body string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func ircReg(url string) string {
	return `id: irc
url: "` + url + `"
as_token: as-irc
hs_token: hs-irc
sender_localpart: ircbot
protocols: [irc]
namespaces:
  users: [{exclusive: true, regex: "@irc_.*"}]
  aliases: [{exclusive: true, regex: "#irc_.*"}]
  rooms: []
`
}

func queryAPI(t *testing.T) *API {
	t.Helper()
	srv := fakeAS(t)
	set, _, err := registry.Load("example.org", writeReg(t, t.TempDir(), "irc.yaml", ircReg(srv.URL)))
	if err != nil {
		t.Fatal(err)
	}
	return &API{q: queries.New(queries.Config{Registry: registry.NewRegistry(set)})}
}

func TestExistenceQueries(t *testing.T) {
	a := queryAPI(t)
	ctx := context.Background()
	for _, tc := range []struct {
		id   string
		want bool
	}{
		{"@irc_yes:example.org", true},
		{"@irc_no:example.org", false},
		{"@other_yes:example.org", false}, // no AS covers it: nobody asked
		{"#irc_yes:example.org", true},
		{"#irc_no:example.org", false},
	} {
		var got bool
		if tc.id[0] == '@' {
			var res appserviceAPI.UserIDExistsResponse
			if err := a.UserIDExists(ctx, &appserviceAPI.UserIDExistsRequest{UserID: tc.id}, &res); err != nil {
				t.Fatal(err)
			}
			got = res.UserIDExists
		} else {
			var res appserviceAPI.RoomAliasExistsResponse
			if err := a.RoomAliasExists(ctx, &appserviceAPI.RoomAliasExistsRequest{Alias: tc.id}, &res); err != nil {
				t.Fatal(err)
			}
			got = res.AliasExists
		}
		if got != tc.want {
			t.Errorf("%s exists = %v, want %v", tc.id, got, tc.want)
		}
	}
}

func TestThirdParty(t *testing.T) {
	a := queryAPI(t)
	ctx := context.Background()

	var protos appserviceAPI.ProtocolResponse
	if err := a.Protocols(ctx, &appserviceAPI.ProtocolRequest{}, &protos); err != nil {
		t.Fatal(err)
	}
	irc, ok := protos.Protocols["irc"]
	if !protos.Exists || !ok || irc.Icon != "mxc://x/y" || len(irc.Instances) != 1 || irc.FieldTypes["network"].Placeholder != "libera" {
		t.Fatalf("protocols %+v", protos)
	}
	var one appserviceAPI.ProtocolResponse
	if err := a.Protocols(ctx, &appserviceAPI.ProtocolRequest{Protocol: "nope"}, &one); err != nil || one.Exists {
		t.Errorf("unknown protocol: %+v %v", one, err)
	}

	for _, tc := range []struct {
		name          string
		protocol, prm string
		want          string
	}{
		{"by fields", "irc", "nickname=bob", "@irc_bob:example.org"},
		{"by user id", "", "userid=%40irc_bob%3Aexample.org", "@irc_bob:example.org"},
		{"no match", "irc", "nickname=carol", ""},
	} {
		var res appserviceAPI.UserResponse
		if err := a.User(ctx, &appserviceAPI.UserRequest{Protocol: tc.protocol, Params: tc.prm}, &res); err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		got := ""
		if len(res.Users) == 1 {
			got = res.Users[0].UserID
		}
		if got != tc.want || res.Exists != (tc.want != "") {
			t.Errorf("%s: %+v", tc.name, res)
		}
	}
	var loc appserviceAPI.LocationResponse
	if err := a.Locations(ctx, &appserviceAPI.LocationRequest{Params: "alias=%23irc_chan%3Aexample.org"}, &loc); err != nil {
		t.Fatal(err)
	}
	if !loc.Exists || len(loc.Locations) != 1 || loc.Locations[0].Alias != "#irc_chan:example.org" {
		t.Errorf("locations by alias %+v", loc)
	}
	if err := a.Locations(ctx, &appserviceAPI.LocationRequest{Protocol: "irc", Params: "%zz"}, &loc); err == nil {
		t.Error("unparsable params accepted")
	}
}
