//! OCI image import (in progress).
