package admin

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"syscall"
	"time"
)

// Client talks to a running agent's admin socket.
type Client struct {
	path string
	hc   *http.Client
}

// NewClient returns a client for the agent serving path. Nothing is
// dialled until a call.
func NewClient(path string) *Client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		},
		MaxIdleConns:    1,
		IdleConnTimeout: 10 * time.Second,
	}
	return &Client{path: path, hc: &http.Client{Transport: tr, Timeout: 60 * time.Second}}
}

// Close releases idle connections.
func (c *Client) Close() { c.hc.CloseIdleConnections() }

// APIError is a non-2xx answer. It wraps ErrNotFound or ErrInvalid for
// 404 and 400, so callers can use errors.Is.
type APIError struct {
	Status int
	Msg    string
}

func (e *APIError) Error() string { return e.Msg }

// Unwrap maps the status to the package's error kinds.
func (e *APIError) Unwrap() error {
	switch e.Status {
	case http.StatusNotFound:
		return ErrNotFound
	case http.StatusBadRequest:
		return ErrInvalid
	}
	return nil
}

// Status returns the agent's status.
func (c *Client) Status(ctx context.Context) (Status, error) {
	var st Status
	err := c.do(ctx, http.MethodGet, "/status", nil, &st)
	return st, err
}

// Conns lists the agent's connections that match q.
func (c *Client) Conns(ctx context.Context, q ConnQuery) ([]Conn, error) {
	v := url.Values{}
	for k, s := range map[string]string{"backend": q.Backend, "client": q.Client, "route": q.Route} {
		if s != "" {
			v.Set(k, s)
		}
	}
	if q.TCP {
		v.Set("tcp", "1")
	}
	path := "/conns"
	if len(v) > 0 {
		path += "?" + v.Encode()
	}
	var cs []Conn
	err := c.do(ctx, http.MethodGet, path, nil, &cs)
	return cs, err
}

// Backends lists the agent's backends.
func (c *Client) Backends(ctx context.Context) ([]Backend, error) {
	var bs []Backend
	err := c.do(ctx, http.MethodGet, "/backends", nil, &bs)
	return bs, err
}

// Drain drains (on) or undrains the backends matching spec.
func (c *Client) Drain(ctx context.Context, spec string, on bool) ([]Backend, error) {
	return c.DrainOver(ctx, spec, on, 0)
}

// DrainOver drains the backends matching spec and, with closeOver > 0,
// closes their established connections gradually over that time.
func (c *Client) DrainOver(ctx context.Context, spec string, on bool, closeOver time.Duration) ([]Backend, error) {
	verb := "/backends/undrain"
	if on {
		verb = "/backends/drain"
	}
	req := backendRequest{Backend: spec}
	if closeOver > 0 {
		req.CloseOver = closeOver.String()
	}
	var bs []Backend
	err := c.do(ctx, http.MethodPost, verb, req, &bs)
	return bs, err
}

// SetWeight sets the weight of the backends matching spec.
func (c *Client) SetWeight(ctx context.Context, spec string, weight int) ([]Backend, error) {
	var bs []Backend
	err := c.do(ctx, http.MethodPost, "/backends/weight", backendRequest{Backend: spec, Weight: &weight}, &bs)
	return bs, err
}

// Kill closes connection id.
func (c *Client) Kill(ctx context.Context, id uint64) error {
	return c.do(ctx, http.MethodPost, "/conns/"+strconv.FormatUint(id, 10)+"/kill", struct{}{}, nil)
}

// Reload asks the agent to re-read its configuration file.
func (c *Client) Reload(ctx context.Context) error {
	return c.do(ctx, http.MethodPost, "/reload", struct{}{}, nil)
}

// LameDuck turns the agent-wide drain on or off (see Handler.LameDuck).
func (c *Client) LameDuck(ctx context.Context, on bool) error {
	path := "/unlameduck"
	if on {
		path = "/lameduck"
	}
	return c.do(ctx, http.MethodPost, path, struct{}{}, nil)
}

// Upgrade asks the agent to replace itself with a new process of binary
// (empty: its own executable) and returns once the new one serves. It
// waits longer than other calls: the new agent loads its configuration
// and data planes, and the connections move in batches.
func (c *Client) Upgrade(ctx context.Context, binary string) (UpgradeResult, error) {
	return c.UpgradeWith(ctx, UpgradeRequest{Binary: binary})
}

// UpgradeWith is Upgrade with every option of the request.
func (c *Client) UpgradeWith(ctx context.Context, req UpgradeRequest) (UpgradeResult, error) {
	var res UpgradeResult
	hc := *c.hc
	hc.Timeout = 5 * time.Minute
	err := c.doWith(ctx, &hc, http.MethodPost, "/upgrade", req, &res)
	return res, err
}

func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	return c.doWith(ctx, c.hc, method, path, in, out)
}

func (c *Client) doWith(ctx context.Context, hc *http.Client, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://wsplice/"+Version+path, body)
	if err != nil {
		return err
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := hc.Do(req)
	if err != nil {
		return c.dialError(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		var eb errorBody
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		if json.Unmarshal(b, &eb) != nil || eb.Error == "" {
			eb.Error = fmt.Sprintf("agent answered %s", resp.Status)
		}
		return &APIError{Status: resp.StatusCode, Msg: eb.Error}
	}
	if out == nil {
		_, _ = io.Copy(io.Discard, resp.Body)
		return nil
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("reading the agent's answer: %w", err)
	}
	return nil
}

// dialError explains why the agent could not be reached.
func (c *Client) dialError(err error) error {
	var op *net.OpError
	if !errors.As(err, &op) || op.Op != "dial" {
		return err
	}
	switch {
	case errors.Is(err, syscall.ENOENT), errors.Is(err, syscall.ECONNREFUSED):
		return fmt.Errorf("%w at %s: is the agent running (wsplice run), and is --admin-socket its admin.socket?", ErrNoAgent, c.path)
	case errors.Is(err, syscall.EACCES), errors.Is(err, syscall.EPERM):
		return fmt.Errorf("%w: permission denied on %s: run as root or as a member of the socket's group", ErrNoAgent, c.path)
	}
	return fmt.Errorf("%w at %s: %v", ErrNoAgent, c.path, err)
}
