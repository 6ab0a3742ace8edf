package config

// Quick is the command-line form of a config, for `wsplice run --listen …
// --backend …` without a file: every listener serves one pool.
type Quick struct {
	Listen    []string // addresses
	Backends  []string // host:port, optionally host:port=weight
	Mode      string
	Dataplane string
	Balance   string
	HashKey   string
	// TLSCert and TLSKey terminate TLS on every listener with one PEM
	// certificate chain and key (--tls-cert, --tls-key).
	TLSCert, TLSKey string
}

// FromQuick builds, defaults and validates a Config from flags.
func FromQuick(q Quick) (*Config, error) {
	cfg := &Config{Dataplane: q.Dataplane}
	pool := Pool{Name: "default", Balance: q.Balance, HashKey: q.HashKey}
	for _, b := range q.Backends {
		be, err := parseBackendFlag(b)
		if err != nil {
			return nil, err
		}
		pool.Backends = append(pool.Backends, be)
	}
	cfg.Pools = []Pool{pool}
	if (q.TLSCert == "") != (q.TLSKey == "") {
		return nil, &FieldError{Field: "--tls-cert/--tls-key", Msg: "give both: the PEM certificate chain and its private key"}
	}
	for _, addr := range q.Listen {
		l := Listener{Address: addr, Mode: q.Mode, Pool: "default"}
		if q.TLSCert != "" {
			l.TLS = &TLS{Certificates: []Certificate{{Cert: q.TLSCert, Key: q.TLSKey}}}
		}
		cfg.Listeners = append(cfg.Listeners, l)
	}
	cfg.SetDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	return cfg, nil
}

// parseBackendFlag reads "host:port", "host:port=3" (weight) or
// "host:port=backup".
func parseBackendFlag(s string) (Backend, error) {
	b := Backend{Address: s}
	for i := len(s) - 1; i >= 0; i-- {
		if s[i] == '=' {
			b.Address = s[:i]
			opt := s[i+1:]
			if opt == "backup" {
				b.Backup = true
				return b, nil
			}
			w := 0
			for _, c := range opt {
				if c < '0' || c > '9' {
					return b, &FieldError{Field: "--backend " + s, Msg: "after = write a weight (1-1000) or backup, e.g. 10.0.0.1:8080=3"}
				}
				w = w*10 + int(c-'0')
				if w > 1000 {
					break
				}
			}
			b.Weight = w
			if w == 0 {
				return b, &FieldError{Field: "--backend " + s, Msg: "weight must be 1 to 1000"}
			}
			return b, nil
		}
	}
	return b, nil
}
