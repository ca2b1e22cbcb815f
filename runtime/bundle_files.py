"""The names of the files that cover a bundle's manifest: shared by runtime.manifest and runtime.signing,
which import this module rather than each other."""

MANIFEST_FILE = "manifest.json"
DIGEST_FILE = "manifest.sha256"  # sha256 of manifest.json, `sha256sum -c` format
SIGNATURE_FILE = "manifest.sig"  # a signature over manifest.json (export --sign, run --trust)
NOT_IN_FILES = (MANIFEST_FILE, DIGEST_FILE, SIGNATURE_FILE)  # cover the manifest, so not listed in it
