package registry

import (
	"regexp"
	"strconv"
	"strings"

	"gopkg.in/yaml.v3"
)

// Synapse reads registrations with PyYAML's safe_load (YAML 1.1), and a file
// must mean the same here. yaml.v3 follows YAML 1.2 and leaves aliases and
// merge keys to its decoder, so its node tree is rewritten before the
// registration is read:
//   - plain scalars get the type PyYAML gives them: `yes`/`on` are booleans,
//     `0x1F` and `1:30` integers, while `1e3` and `1.5e3` are strings (YAML
//     1.1 floats need a dot and a signed exponent);
//   - aliases, as values or as keys, stand for the anchored node;
//   - merge keys (`<<: *defaults`, `<<: [*a, *b]`) are expanded as PyYAML
//     does: keys written in the mapping win over merged ones, and of a list
//     the first mapping wins;
//   - a key written twice is refused with both lines (PyYAML would silently
//     keep the last one, which hides mistakes such as two `users:` lists).

// The implicit resolvers of PyYAML's SafeLoader (resolver.py), full-match;
// its null and bool resolvers are word lists, in resolveTag's switch (a
// regex match each cost most of the resolver's time, for the booleans of
// every registration).
var (
	pyInt   = regexp.MustCompile(`^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+|[-+]?[1-9][0-9_]*(?::[0-5]?[0-9])+)$`)
	pyFloat = regexp.MustCompile(`^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?|[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$`)
	pyTime  = regexp.MustCompile(`^(?:[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]|[0-9][0-9][0-9][0-9]-[0-9][0-9]?-[0-9][0-9]?(?:[Tt]|[ \t]+)[0-9][0-9]?:[0-9][0-9]:[0-9][0-9](?:\.[0-9]*)?(?:[ \t]*(?:Z|[-+][0-9][0-9]?(?::[0-9][0-9])?))?)$`)
)

// pyTag returns the tag PyYAML resolves a plain scalar to.
func pyTag(v string) string {
	if v != "" && !strings.ContainsRune("~nNyYtTfFoO+-0123456789.<=", rune(v[0])) {
		// No resolver below matches a scalar starting so: most values
		// (ids, URLs, tokens) are strings at one comparison, not five
		// regex matches.
		return "!!str"
	}
	return resolveTag(v)
}

// resolveTag is pyTag by PyYAML's resolvers alone.
func resolveTag(v string) string {
	switch v {
	case "~", "null", "Null", "NULL", "":
		return "!!null"
	case "yes", "Yes", "YES", "no", "No", "NO", "true", "True", "TRUE", "false", "False", "FALSE", "on", "On", "ON", "off", "Off", "OFF":
		return "!!bool"
	}
	switch {
	case pyInt.MatchString(v):
		return "!!int"
	case pyFloat.MatchString(v):
		return "!!float"
	case pyTime.MatchString(v):
		return "!!timestamp"
	case v == "<<":
		return "!!merge"
	case v == "=":
		return "!!value"
	}
	return "!!str"
}

// pyTrue reports the value of a scalar PyYAML reads as a boolean.
func pyTrue(v string) bool {
	switch strings.ToLower(v) {
	case "yes", "true", "on":
		return true
	}
	return false
}

// maxNodes bounds the tree after expanding aliases: a registration is a few
// dozen nodes, and nested aliases could otherwise multiply ("billion laughs").
const maxNodes = 100_000

// resolver rewrites a yaml.v3 node tree into what PyYAML would construct.
type resolver struct {
	p       *parser
	nodes   int
	active  map[*yaml.Node]bool // anchored nodes being resolved: an alias to one is a cycle
	stopped bool
	// inPlace: the tree has no anchors, so each node is resolved once and
	// may be rewritten where it is instead of copied (most registrations:
	// the copies were a sixth of loading 10,000 of them).
	inPlace bool
}

func (p *parser) resolve(n *yaml.Node) *yaml.Node {
	r := &resolver{p: p, active: map[*yaml.Node]bool{}, inPlace: !anchored(n)}
	return r.node(n, "(file)")
}

// anchored reports whether the tree has an anchor or an alias.
func anchored(n *yaml.Node) bool {
	if n.Anchor != "" || n.Kind == yaml.AliasNode {
		return true
	}
	for _, c := range n.Content {
		if anchored(c) {
			return true
		}
	}
	return false
}

// node returns n resolved (nil after a problem that stops the walk): a
// copy, or n itself rewritten when r.inPlace. field names the place for
// messages.
func (r *resolver) node(n *yaml.Node, field string) *yaml.Node {
	if r.stopped {
		return nil
	}
	if r.nodes++; r.nodes > maxNodes {
		r.p.fail(n, field, "more than %d nodes once aliases are expanded", maxNodes)
		r.stopped = true
		return nil
	}
	if n.Anchor != "" && n.Kind != yaml.AliasNode {
		r.active[n] = true
		defer delete(r.active, n)
	}
	switch n.Kind {
	case yaml.DocumentNode:
		if len(n.Content) == 0 {
			return nil
		}
		return r.node(n.Content[0], field)
	case yaml.AliasNode:
		if n.Alias == nil || r.active[n.Alias] {
			r.p.fail(n, field, "alias *%s refers to a node that contains it", n.Value)
			return nil
		}
		out := r.node(n.Alias, field)
		if out != nil && out.Kind == yaml.ScalarNode {
			// A scalar is reported where it is used, not where anchored.
			c := *out
			c.Line, c.Column = n.Line, n.Column
			out = &c
		}
		return out
	case yaml.ScalarNode:
		var tag string
		switch {
		case n.Style&yaml.TaggedStyle != 0:
			tag = n.Tag
			if !strings.HasPrefix(tag, "!!") {
				r.p.fail(n, field, "tag %s is not one PyYAML's safe_load knows", n.Tag)
			}
		case n.Style&(yaml.DoubleQuotedStyle|yaml.SingleQuotedStyle|yaml.LiteralStyle|yaml.FoldedStyle) != 0:
			tag = "!!str"
		default:
			tag = pyTag(n.Value)
			if tag == "!!value" {
				r.p.fail(n, field, "a plain `=` is YAML 1.1's value key, which PyYAML cannot load; quote it")
			}
		}
		if r.inPlace {
			n.Tag, n.Style = tag, n.Style&^yaml.TaggedStyle
			return n
		}
		return &yaml.Node{Kind: yaml.ScalarNode, Tag: tag, Value: n.Value, Line: n.Line, Column: n.Column, Style: n.Style &^ yaml.TaggedStyle}
	case yaml.SequenceNode:
		items := n.Content
		c := &yaml.Node{Kind: yaml.SequenceNode, Tag: "!!seq", Line: n.Line, Column: n.Column}
		if r.inPlace {
			// Item i is read before slot i is written.
			c = n
			c.Tag, c.Style, c.Content = "!!seq", 0, items[:0]
		}
		for i, item := range items {
			if v := r.node(item, indexField(field, i)); v != nil {
				c.Content = append(c.Content, v)
			}
		}
		return c
	case yaml.MappingNode:
		return r.mapping(n, field)
	}
	return nil
}

type pair struct{ k, v *yaml.Node }

// keyID is a mapping key as PyYAML tells keys apart: by type and value.
type keyID struct{ tag, value string }

// mapping resolves a mapping: merged pairs first, then those written in it,
// each key once with its last value (PyYAML's flatten_mapping and
// construct_mapping). A key written twice is a problem.
func (r *resolver) mapping(n *yaml.Node, field string) *yaml.Node {
	var merged, own []pair
	written := map[keyID]*yaml.Node{} // key -> where it was first written
	for i := 0; i+1 < len(n.Content); i += 2 {
		k := r.node(n.Content[i], field)
		if k == nil {
			continue
		}
		name := keyField(field, k)
		if k.Kind != yaml.ScalarNode {
			r.p.fail(n.Content[i], field, "a key must be a scalar, got %s (PyYAML: unhashable key)", kindName(k))
			continue
		}
		id := keyID{k.Tag, k.Value}
		if first, dup := written[id]; dup {
			r.p.fail(n.Content[i], name, "key written twice (first on line %d); PyYAML would silently keep the last", first.Line)
			continue
		}
		written[id] = k
		v := r.node(n.Content[i+1], name)
		if v == nil {
			continue
		}
		if k.Tag != "!!merge" {
			own = append(own, pair{k, v})
			continue
		}
		switch v.Kind {
		case yaml.MappingNode:
			merged = append(merged, pairsOf(v)...)
		case yaml.SequenceNode:
			// The first mapping of the list wins: add them last to first.
			for j := len(v.Content) - 1; j >= 0; j-- {
				if m := v.Content[j]; m.Kind != yaml.MappingNode {
					r.p.fail(m, indexField(name, j), "a merge key takes mappings, got %s", shapeName(m))
				} else {
					merged = append(merged, pairsOf(m)...)
				}
			}
		default:
			r.p.fail(n.Content[i+1], name, "a merge key takes a mapping or a list of mappings, got %s", shapeName(v))
		}
	}
	c := &yaml.Node{Kind: yaml.MappingNode, Tag: "!!map", Line: n.Line, Column: n.Column}
	if r.inPlace {
		c = n
		c.Tag, c.Style, c.Content = "!!map", 0, nil
	}
	if len(merged) == 0 {
		// Each key once already: keys written twice were refused.
		c.Content = make([]*yaml.Node, 0, 2*len(own))
		for _, p := range own {
			c.Content = append(c.Content, p.k, p.v)
		}
		return c
	}
	at := map[keyID]int{}
	for _, p := range append(merged, own...) {
		id := keyID{p.k.Tag, p.k.Value}
		if i, ok := at[id]; ok {
			c.Content[i+1] = p.v
			continue
		}
		at[id] = len(c.Content)
		c.Content = append(c.Content, p.k, p.v)
	}
	return c
}

func pairsOf(m *yaml.Node) []pair {
	out := make([]pair, 0, len(m.Content)/2)
	for i := 0; i+1 < len(m.Content); i += 2 {
		out = append(out, pair{m.Content[i], m.Content[i+1]})
	}
	return out
}

// indexField extends a field path with a list index: "users" + 0.
func indexField(field string, i int) string {
	return field + "[" + strconv.Itoa(i) + "]"
}

// keyField extends a field path with a key: "namespaces" + "users".
func keyField(field string, k *yaml.Node) string {
	if field == "(file)" {
		return k.Value
	}
	return field + "." + k.Value
}

// IsYAMLString reports whether PyYAML (and so Synapse) reads the scalar n
// as a string: quoted, tagged !!str, or plain and not a null, boolean,
// number or date in YAML 1.1. Other config files Synapse reads (such as
// app_service_config_files in homeserver.yaml) can check their values with
// it.
func IsYAMLString(n *yaml.Node) bool {
	if n.Kind != yaml.ScalarNode {
		return false
	}
	switch {
	case n.Style&yaml.TaggedStyle != 0:
		return n.ShortTag() == "!!str"
	case n.Style&(yaml.DoubleQuotedStyle|yaml.SingleQuotedStyle|yaml.LiteralStyle|yaml.FoldedStyle) != 0:
		return true
	}
	return pyTag(n.Value) == "!!str"
}

// shapeName names a node's type without its value: a merged scalar may be
// an anchored token.
func shapeName(n *yaml.Node) string {
	if n.Kind == yaml.ScalarNode {
		return strings.TrimPrefix(n.Tag, "!!")
	}
	return kindName(n)
}
