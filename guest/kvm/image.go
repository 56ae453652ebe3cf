package kvm

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// ImageEnv names the environment variable that overrides the image path.
const ImageEnv = "TANDEM_KVM_IMAGE"

// imageRel is where `make guest-image` leaves the micro-guest in the repo.
const imageRel = "guest/kvm/microguest/microguest.bin"

// ErrImage is returned for a missing or malformed micro-guest image.
var ErrImage = errors.New("kvm: bad guest image")

// image is a validated micro-guest.
type image struct {
	path   string
	data   []byte
	entry  uint64
	stubs  uint64
	stride uint32
	nstubs uint32
	end    uint64
}

// DefaultImage finds the micro-guest without flags: $TANDEM_KVM_IMAGE if
// set, else microguest.bin next to the executable, else the repo path
// guest/kvm/microguest/microguest.bin under the executable's parent (bin/
// in a checkout), the working directory and the module root above it.
func DefaultImage() (string, error) {
	if p := os.Getenv(ImageEnv); p != "" {
		if _, err := os.Stat(p); err != nil {
			return "", fmt.Errorf("%w: $%s=%s: %v (run make guest-image)", ErrImage, ImageEnv, p, err)
		}
		return p, nil
	}
	var tried []string
	try := func(p string) bool {
		tried = append(tried, p)
		st, err := os.Stat(p)
		return err == nil && st.Mode().IsRegular()
	}
	if exe, err := os.Executable(); err == nil {
		dir := filepath.Dir(exe)
		for _, p := range []string{filepath.Join(dir, "microguest.bin"), filepath.Join(dir, "..", imageRel)} {
			if try(p) {
				return p, nil
			}
		}
	}
	if wd, err := os.Getwd(); err == nil {
		for dir := wd; ; dir = filepath.Dir(dir) {
			if dir == wd || isModuleRoot(dir) {
				if p := filepath.Join(dir, imageRel); try(p) {
					return p, nil
				}
			}
			if filepath.Dir(dir) == dir {
				break
			}
		}
	}
	return "", fmt.Errorf("%w: micro-guest not found (looked in $%s, %s); run make guest-image", ErrImage, ImageEnv, strings.Join(tried, ", "))
}

func isModuleRoot(dir string) bool {
	b, err := os.ReadFile(filepath.Join(dir, "go.mod"))
	return err == nil && strings.Contains(string(b), "module github.com/tandemvm/tandem\n")
}

// loadImage reads and checks an image: header magic and version, entry and
// stubs inside the image, and a footprint that fits below the kv table.
func loadImage(path string) (*image, error) {
	if path == "" {
		p, err := DefaultImage()
		if err != nil {
			return nil, err
		}
		path = p
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("%w: %v (run make guest-image)", ErrImage, err)
	}
	return parseImage(path, data)
}

func parseImage(path string, data []byte) (*image, error) {
	bad := func(why string, args ...any) error {
		return fmt.Errorf("%w: %s: %s", ErrImage, path, fmt.Sprintf(why, args...))
	}
	if len(data) < imageHeaderBytes {
		return nil, bad("%d bytes, too short for the %d-byte header", len(data), imageHeaderBytes)
	}
	le := binary.LittleEndian
	if m := le.Uint64(data); m != imageMagic {
		return nil, bad("magic %#x, want %#x (not a Tandem micro-guest)", m, uint64(imageMagic))
	}
	if v := le.Uint32(data[8:]); v != 1 {
		return nil, bad("image version %d, this Tandem reads version 1", v)
	}
	img := &image{path: path, data: data, entry: le.Uint64(data[16:]), stubs: le.Uint64(data[24:]),
		stride: le.Uint32(data[32:]), nstubs: le.Uint32(data[36:]), end: le.Uint64(data[40:])}
	size := uint64(len(data))
	inImage := func(a uint64) bool { return a >= imageGPA && a < imageGPA+size }
	switch {
	case le.Uint32(data[12:]) != imageHeaderBytes:
		return nil, bad("header size %d, want %d", le.Uint32(data[12:]), imageHeaderBytes)
	case !inImage(img.entry):
		return nil, bad("entry %#x outside the image", img.entry)
	case img.nstubs != 32 || img.stride < 8 || img.stride > 64 || !inImage(img.stubs) ||
		!inImage(img.stubs+uint64(img.stride)*uint64(img.nstubs-1)):
		return nil, bad("exception stubs at %#x (%d x %d bytes) do not fit the image", img.stubs, img.nstubs, img.stride)
	case img.end < imageGPA+size || img.end > kvGPA:
		return nil, bad("footprint ends at %#x, want between %#x and %#x", img.end, imageGPA+size, uint64(kvGPA))
	}
	return img, nil
}
