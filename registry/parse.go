package registry

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/url"
	"regexp"
	"strings"

	"gopkg.in/yaml.v3"

	"github.com/asdispatch/asdispatch/namespace"
	"github.com/asdispatch/asdispatch/secret"
)

// Problem is one thing wrong with a registration file.
type Problem struct {
	Line   int
	Column int
	// Field is the path of the offending key, like namespaces.users[0].regex.
	Field  string
	Reason string
}

// FileError lists every problem of one file.
type FileError struct {
	File     string
	Problems []Problem
}

func (e *FileError) Error() string {
	var b strings.Builder
	for i, p := range e.Problems {
		if i > 0 {
			b.WriteByte('\n')
		}
		fmt.Fprintf(&b, "%s:%d: %s: %s", e.File, p.Line, p.Field, p.Reason)
	}
	return b.String()
}

// Warning is a lint finding: valid, but surely not what was meant.
type Warning struct {
	File    string
	Line    int
	Field   string
	Message string
}

func (w Warning) String() string {
	return fmt.Sprintf("%s:%d: %s: %s", w.File, w.Line, w.Field, w.Message)
}

// localpartRE is the historical Matrix user localpart grammar (lenient, as
// homeservers accept existing localparts).
var localpartRE = regexp.MustCompile(`^[a-zA-Z0-9._=\-/+]+$`)

type parser struct {
	file     string
	problems []Problem
	warnings []Warning
	// parsed holds each namespace's regex parsed (nil if it did not), by
	// kind and index, for the lint and for NewSet.
	parsed [3][]*namespace.Parsed
	// cache shares the parse of a regex several namespaces have (nil:
	// none).
	cache map[string]*namespace.Parsed
}

func (p *parser) fail(n *yaml.Node, field, format string, args ...any) {
	pr := Problem{Field: field, Reason: fmt.Sprintf(format, args...)}
	if n != nil {
		pr.Line, pr.Column = n.Line, n.Column
	}
	p.problems = append(p.problems, pr)
}

func (p *parser) warn(n *yaml.Node, field, format string, args ...any) {
	w := Warning{File: p.file, Field: field, Message: fmt.Sprintf(format, args...)}
	if n != nil {
		w.Line = n.Line
	}
	p.warnings = append(p.warnings, w)
}

// Parse reads one registration. Every problem of the file is reported in
// one *FileError; warnings do not stop it.
func Parse(file string, data []byte) (*Registration, []Warning, error) {
	r, w, _, err := parse(file, data, nil)
	return r, w, err
}

// parse is Parse that also returns the parsed regexes of the
// registration's namespaces in setPatterns order, for newSet.
func parse(file string, data []byte, cache map[string]*namespace.Parsed) (*Registration, []Warning, []*namespace.Parsed, error) {
	p := &parser{file: file, cache: cache}
	r, w, err := p.parse(data)
	if err != nil {
		return nil, w, nil, err
	}
	var parsed []*namespace.Parsed
	for _, k := range []namespace.Kind{namespace.Users, namespace.Aliases, namespace.Rooms} {
		parsed = append(parsed, p.parsed[k]...)
	}
	return r, w, parsed, nil
}

func (p *parser) parse(data []byte) (*Registration, []Warning, error) {
	file := p.file
	var doc, next yaml.Node
	dec := yaml.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(&doc); err != nil && !errors.Is(err, io.EOF) {
		return nil, nil, &FileError{File: file, Problems: []Problem{{Line: yamlErrLine(err), Field: "(file)", Reason: "not valid YAML: " + err.Error()}}}
	}
	if len(doc.Content) == 0 {
		return nil, nil, &FileError{File: file, Problems: []Problem{{Line: 1, Field: "(file)", Reason: "empty file"}}}
	}
	if err := dec.Decode(&next); err == nil {
		p.fail(&next, "(file)", "a second YAML document; a registration is one (PyYAML's safe_load refuses more)")
	}
	// The resolver's problems (a key written twice, a bad alias) are
	// reported together with those of the fields.
	root := p.resolve(&doc)
	if root == nil {
		return nil, nil, &FileError{File: file, Problems: p.problems}
	}
	if root.Kind != yaml.MappingNode {
		p.fail(root, "(file)", "a registration is a mapping of keys, got %s", kindName(root))
		return nil, nil, &FileError{File: file, Problems: p.problems}
	}
	r := &Registration{File: file, RateLimited: true, Extra: map[string]any{}}
	seen := map[string]*yaml.Node{}
	for i := 0; i+1 < len(root.Content); i += 2 {
		k, v := root.Content[i], root.Content[i+1]
		if k.Tag != "!!str" {
			// PyYAML reads `1: x` or `yes: x` as a non-string key, which
			// no field of a registration is.
			var x any
			_ = v.Decode(&x)
			r.Extra[k.Value] = x
			continue
		}
		seen[k.Value] = v // the resolver refused keys written twice
		switch k.Value {
		case "id":
			r.ID = p.str(v, "id")
			if strings.Contains(r.ID, "|") {
				p.fail(v, "id", "must not contain '|' (third-party instance ids use it as a separator)")
			} else if r.ID == "" && v.Tag != "!!null" {
				p.fail(v, "id", "must not be empty")
			}
		case "url":
			if v.Tag == "!!null" {
				break // explicit null: no pushes, no queries
			}
			r.URL, r.HasURL = p.str(v, "url"), true
			if u, err := url.Parse(r.URL); r.URL != "" && (err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "") {
				p.fail(v, "url", "must be an http(s) URL or null, got %q", r.URL)
			}
		case "as_token":
			r.ASToken = secret.New(p.str(v, "as_token"))
		case "hs_token":
			r.HSToken = secret.New(p.str(v, "hs_token"))
		case "sender_localpart":
			r.SenderLocalpart = p.str(v, "sender_localpart")
			if r.SenderLocalpart != "" && !localpartRE.MatchString(r.SenderLocalpart) {
				p.fail(v, "sender_localpart", "%q is not a valid user localpart", r.SenderLocalpart)
			}
		case "namespaces":
			p.namespaces(v, &r.Namespaces)
		case "rate_limited":
			if v.Kind == yaml.ScalarNode && v.Tag == "!!bool" {
				r.RateLimited = pyTrue(v.Value)
			} else {
				// Synapse ignores a rate_limited that is not a boolean.
				p.warn(v, "rate_limited", "not true or false (got %s); ignored, so this AS's users are rate limited, as on Synapse", kindName(v))
			}
		case "protocols":
			r.Protocols = p.protocols(v)
		case "receive_ephemeral":
			r.ReceiveEphemeral = p.boolean(v, k.Value) || r.ReceiveEphemeral
		case "de.sorunome.msc2409.push_ephemeral", "push_ephemeral":
			if p.boolean(v, k.Value) {
				r.ReceiveEphemeral, r.EphemeralUnstable = true, true
			}
		case "org.matrix.msc3202":
			r.MSC3202 = p.boolean(v, k.Value)
		case "io.element.msc4190":
			r.MSC4190 = p.boolean(v, k.Value)
		case "asdispatch.legacy":
			r.Legacy = p.boolean(v, k.Value)
		default:
			var x any
			_ = v.Decode(&x)
			r.Extra[k.Value] = x
		}
	}
	for _, req := range []string{"id", "url", "as_token", "hs_token", "sender_localpart", "namespaces"} {
		if v, ok := seen[req]; !ok {
			reason := "required"
			if req == "url" {
				reason = "required (use `url: null` for an AS that receives nothing)"
			}
			p.fail(root, req, "%s", reason)
		} else if req != "url" && req != "namespaces" && (v.Tag == "!!null" || v.Value == "") && v.Kind == yaml.ScalarNode {
			p.fail(v, req, "must not be empty")
		}
	}
	if len(p.problems) > 0 {
		return nil, p.warnings, &FileError{File: file, Problems: p.problems}
	}
	p.lint(r)
	return r, p.warnings, nil
}

func yamlErrLine(err error) int {
	var line int
	if _, e := fmt.Sscanf(strings.TrimPrefix(err.Error(), "yaml: "), "line %d:", &line); e == nil {
		return line
	}
	return 1
}

func kindName(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a list"
	case yaml.ScalarNode:
		if n.Tag == "!!null" {
			return "null"
		}
		return fmt.Sprintf("%s %q", strings.TrimPrefix(n.Tag, "!!"), n.Value)
	}
	return "an alias"
}

// str returns a string scalar, "" for null. Anything PyYAML reads as
// another type (`0x1F`, `123`, `yes`, a date) is refused, as Synapse does:
// quote it to make it a string.
func (p *parser) str(n *yaml.Node, field string) string {
	if n.Kind != yaml.ScalarNode || n.Tag != "!!str" {
		if n.Kind == yaml.ScalarNode && n.Tag == "!!null" {
			return ""
		}
		reason := "must be a string, got %s"
		if n.Kind == yaml.ScalarNode {
			reason += " (quote it to make it a string)"
		}
		p.fail(n, field, reason, p.describe(n, field))
		return ""
	}
	return n.Value
}

// describe names a node's type without quoting a token's value.
func (p *parser) describe(n *yaml.Node, field string) string {
	if strings.HasSuffix(field, "_token") && n.Kind == yaml.ScalarNode {
		return strings.TrimPrefix(n.Tag, "!!")
	}
	return kindName(n)
}

// boolean returns a boolean as PyYAML reads one (true, yes, on, ...).
func (p *parser) boolean(n *yaml.Node, field string) bool {
	if n.Kind != yaml.ScalarNode || n.Tag != "!!bool" {
		p.fail(n, field, "must be true or false, got %s", kindName(n))
		return false
	}
	return pyTrue(n.Value)
}

// protocols reads the protocols list as Synapse does: a false value (null,
// an empty list or string, 0, false) means none; anything else must be a
// list of strings.
func (p *parser) protocols(n *yaml.Node) []string {
	const field = "protocols"
	if n.Kind == yaml.ScalarNode && (n.Tag == "!!null" || n.Value == "" || (n.Tag == "!!bool" && !pyTrue(n.Value)) || (n.Tag == "!!int" && strings.Trim(n.Value, "+-0_") == "")) {
		if n.Tag != "!!null" {
			p.warn(n, field, "%s is not a list; ignored, as Synapse does (no protocols)", kindName(n))
		}
		return nil
	}
	if n.Kind != yaml.SequenceNode {
		p.fail(n, field, "must be a list of strings, got %s", kindName(n))
		return nil
	}
	out := make([]string, 0, len(n.Content))
	for i, c := range n.Content {
		out = append(out, p.str(c, indexField(field, i)))
	}
	return out
}

func (p *parser) namespaces(n *yaml.Node, ns *Namespaces) {
	if n.Kind != yaml.MappingNode {
		p.fail(n, "namespaces", "must be a mapping with users, aliases and rooms lists, got %s", kindName(n))
		return
	}
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := n.Content[i], n.Content[i+1]
		field := "namespaces." + k.Value
		var dst *[]Namespace
		var kind namespace.Kind
		switch k.Value {
		case "users":
			dst, kind = &ns.Users, namespace.Users
		case "aliases":
			dst, kind = &ns.Aliases, namespace.Aliases
		case "rooms":
			dst, kind = &ns.Rooms, namespace.Rooms
		default:
			p.fail(k, field, "unknown namespace kind (want users, aliases or rooms)")
			continue
		}
		if v.Tag == "!!null" {
			continue // omitted list, as mautrix registrations write it
		}
		if v.Kind != yaml.SequenceNode {
			p.fail(v, field, "must be a list of {regex, exclusive}, got %s", kindName(v))
			continue
		}
		for j, e := range v.Content {
			ef := indexField(field, j)
			if e.Kind != yaml.MappingNode {
				p.fail(e, ef, "must be a mapping {regex: string, exclusive: bool}, got %s", kindName(e))
				continue
			}
			entry := Namespace{Line: e.Line}
			var parsed *namespace.Parsed
			var hasRegex, hasExcl bool
			for m := 0; m+1 < len(e.Content); m += 2 {
				ek, ev := e.Content[m], e.Content[m+1]
				switch ek.Value {
				case "regex":
					hasRegex = true
					if ev.Kind != yaml.ScalarNode || ev.Tag != "!!str" {
						// `regex: 123` is a number to PyYAML, and Synapse
						// refuses it, as it refuses a null one.
						p.str(ev, ef+".regex")
						if ev.Tag == "!!null" {
							p.fail(ev, ef+".regex", "must be a string, got null")
						}
						break
					}
					entry.Regex = ev.Value
					var err error
					if parsed, err = p.parseRegex(entry.Regex); err != nil {
						p.fail(ev, ef+".regex", "%v", err)
					}
				case "exclusive":
					hasExcl = true
					entry.Exclusive = p.boolean(ev, ef+".exclusive")
				}
			}
			if !hasRegex {
				p.fail(e, ef+".regex", "required")
			}
			if !hasExcl {
				p.fail(e, ef+".exclusive", "required")
			}
			*dst = append(*dst, entry)
			p.parsed[kind] = append(p.parsed[kind], parsed)
		}
	}
}

// parseRegex checks and analyzes a namespace regex, once for every
// namespace that has it.
func (p *parser) parseRegex(regex string) (*namespace.Parsed, error) {
	if pr := p.cache[regex]; pr != nil {
		return pr, nil
	}
	pr, err := namespace.Parse(regex)
	if err == nil && p.cache != nil {
		p.cache[regex] = pr
	}
	return pr, err
}

// lint warns about what is valid but will surely go wrong. It asks the
// parsed regexes, which compile one only when their literals cannot tell.
func (p *parser) lint(r *Registration) {
	sigils := map[namespace.Kind]string{namespace.Users: "@", namespace.Aliases: "#", namespace.Rooms: "!"}
	for _, kind := range []namespace.Kind{namespace.Users, namespace.Aliases, namespace.Rooms} {
		for i, n := range r.Namespaces.Of(kind) {
			field := fmt.Sprintf("namespaces.%s[%d].regex", kind, i)
			pr := p.parsed[kind][i]
			if pr == nil {
				continue
			}
			sig := sigils[kind]
			conflicts := func(lit string) bool {
				return lit != "" && !strings.HasPrefix(lit, sig) && !strings.HasPrefix(sig, lit)
			}
			lit, sure := pr.LiteralPrefix()
			if !sure && conflicts(lit) {
				// A one-pass program has this prefix, any other none.
				lit = ""
				if plain, err := regexp.Compile(n.Regex); err == nil {
					lit, _ = plain.LiteralPrefix()
				}
			}
			if conflicts(lit) {
				p.warnLine(n.Line, field, "can never match: %s IDs start with %q", kind, sig)
			}
			if kind != namespace.Rooms && pr.Match(sig) && pr.Match(sig+"a:b") && pr.Match(sig+"zz_9:other.example") {
				p.warnLine(n.Line, field, "%q matches every %s", n.Regex, kind)
			}
			if kind == namespace.Rooms && strings.Contains(n.Regex, ":") {
				p.warnLine(n.Line, field, "names a server part; room IDs of room version 12 have none")
			}
		}
	}
	if r.HasURL && r.URL == "" {
		p.warn(nil, "url", "empty url: nothing can be sent; use `url: null` to say so")
	}
}

func (p *parser) warnLine(line int, field, format string, args ...any) {
	p.warnings = append(p.warnings, Warning{File: p.file, Line: line, Field: field, Message: fmt.Sprintf(format, args...)})
}
