package balance

import (
	"net/netip"
	"strings"
	"testing"
)

func TestParseKeySpec(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want KeySpec
		err  string
	}{
		{"client_ip", KeySpec{Kind: KeyClientIP}, ""},
		{"client_ip/24", KeySpec{Kind: KeyClientIP, V4Prefix: 24, V6Prefix: 64}, ""},
		{"client_ip/32", KeySpec{Kind: KeyClientIP, V4Prefix: 32, V6Prefix: 64}, ""},
		{"client_ip/56", KeySpec{Kind: KeyClientIP, V6Prefix: 56}, ""},
		{"client_port", KeySpec{Kind: KeyClientPort}, ""},
		{"header:X-User-Id", KeySpec{Kind: KeyHeader, Name: "X-User-Id"}, ""},
		{"cookie:sid", KeySpec{Kind: KeyCookie, Name: "sid"}, ""},
		{"query:room", KeySpec{Kind: KeyQuery, Name: "room"}, ""},
		{"path", KeySpec{Kind: KeyPath}, ""},
		{"uri", KeySpec{Kind: KeyURI}, ""},
		{"client_ip/0", KeySpec{}, "prefix must be 1 to 128"},
		{"client_ip/129", KeySpec{}, "prefix must be 1 to 128"},
		{"client_ip/x", KeySpec{}, "prefix must be 1 to 128"},
		{"header:", KeySpec{}, "needs a name"},
		{"path:x", KeySpec{}, "takes no argument"},
		{"client_ip:x", KeySpec{}, "takes no argument"},
		{"host", KeySpec{}, "is not a hash key"},
		{"", KeySpec{}, "is not a hash key"},
	} {
		got, err := ParseKeySpec(tc.in)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("ParseKeySpec(%q) error = %v, want one containing %q", tc.in, err, tc.err)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("ParseKeySpec(%q) = %+v, %v, want %+v", tc.in, got, err, tc.want)
		}
		if got.String() != tc.in {
			t.Errorf("ParseKeySpec(%q).String() = %q", tc.in, got.String())
		}
	}
}

func TestKeySpecKey(t *testing.T) {
	headers := map[string]string{
		"x-user-id": " 42 ",
		"cookie":    `a=1; sid="abc"; b=2`,
		"x-empty":   "",
	}
	in := &KeyInput{
		Client: netip.MustParseAddrPort("10.1.2.3:5555"),
		Target: "/chat/room?room=7&x=&y#frag",
		Header: func(n string) (string, bool) {
			for k, v := range headers {
				if strings.EqualFold(k, n) {
					return v, true
				}
			}
			return "", false
		},
	}
	spec := func(s string) KeySpec {
		k, err := ParseKeySpec(s)
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	for _, tc := range []struct {
		spec string
		want Key
	}{
		{"client_ip", HashAddr(netip.MustParseAddr("10.1.2.3"), 0, 0)},
		{"client_ip/24", HashAddr(netip.MustParseAddr("10.1.2.77"), 24, 64)},
		{"client_port", HashAddrPort(netip.MustParseAddrPort("10.1.2.3:5555"))},
		{"header:X-User-Id", HashString("42")},
		{"header:X-Empty", Key{}},
		{"header:X-Missing", Key{}},
		{"cookie:sid", HashString("abc")},
		{"cookie:a", HashString("1")},
		{"cookie:nope", Key{}},
		{"query:room", HashString("7")},
		{"query:x", Key{}},
		{"query:y", Key{}},
		{"query:z", Key{}},
		{"path", HashString("/chat/room")},
		{"uri", HashString("/chat/room?room=7&x=&y#frag")},
	} {
		if got := spec(tc.spec).Key(in); got != tc.want {
			t.Errorf("%s: Key = %+v, want %+v", tc.spec, got, tc.want)
		}
	}
	// A tcp listener has no head: only the address kinds have keys.
	tcp := &KeyInput{Client: netip.MustParseAddrPort("[2001:db8::1]:1")}
	for _, s := range []string{"header:X", "cookie:c", "query:q", "path", "uri"} {
		if k := spec(s).Key(tcp); k.Present {
			t.Errorf("%s on a tcp connection: key present", s)
		}
	}
	if !spec("client_ip").Key(tcp).Present {
		t.Errorf("client_ip on a tcp connection: key missing")
	}
	if (KeySpec{}).Key(in).Present {
		t.Errorf("zero KeySpec gives a present key")
	}
	for _, s := range []string{"cookie:sid", "header:X-User-Id", "query:room", "path", "client_ip/24"} {
		k := spec(s)
		if n := testing.AllocsPerRun(100, func() { _ = k.Key(in) }); n != 0 {
			t.Errorf("%s: KeySpec.Key allocates %.0f times", s, n)
		}
	}
}

func TestCookieValue(t *testing.T) {
	for _, tc := range []struct {
		h, name, want string
		ok            bool
	}{
		{"sid=1", "sid", "1", true},
		{"a=1;sid=2", "sid", "2", true},
		{"a=1;  sid = 3 ; b=4", "sid", "3", true},
		{`sid="q"`, "sid", "q", true},
		{`sid=""`, "sid", "", true},
		{"SID=1", "sid", "", false},
		{"xsid=1; sid=5; sid=6", "sid", "5", true},
		{"sid", "sid", "", false},
		{"", "sid", "", false},
	} {
		got, ok := CookieValue(tc.h, tc.name)
		if got != tc.want || ok != tc.ok {
			t.Errorf("CookieValue(%q, %q) = %q, %v, want %q, %v", tc.h, tc.name, got, ok, tc.want, tc.ok)
		}
	}
}

func TestQueryValue(t *testing.T) {
	for _, tc := range []struct {
		target, name, want string
		ok                 bool
	}{
		{"/a?x=1", "x", "1", true},
		{"/a?y=2&x=1&x=3", "x", "1", true},
		{"/a?x", "x", "", true},
		{"/a?x=a%20b", "x", "a%20b", true},
		{"/a?xx=1", "x", "", false},
		{"/a", "x", "", false},
		{"/a?x=1#f", "x", "1", true},
		{"/a?y=1#x=2", "x", "", false},
	} {
		got, ok := QueryValue(tc.target, tc.name)
		if got != tc.want || ok != tc.ok {
			t.Errorf("QueryValue(%q, %q) = %q, %v, want %q, %v", tc.target, tc.name, got, ok, tc.want, tc.ok)
		}
	}
}

func TestPathOf(t *testing.T) {
	for in, want := range map[string]string{
		"/":                    "/",
		"/a/b":                 "/a/b",
		"/a/b?x=1":             "/a/b",
		"/a?x=http://h/":       "/a",
		"http://h/a/b?x":       "/a/b",
		"https://h:8443":       "/",
		"http://h?x=/y":        "/",
		"/a#frag":              "/a",
		"":                     "",
		"ws://h.example/chat/": "/chat/",
	} {
		if got := PathOf(in); got != want {
			t.Errorf("PathOf(%q) = %q, want %q", in, got, want)
		}
	}
}
