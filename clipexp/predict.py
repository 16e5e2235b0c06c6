"""``python -m clipexp.predict`` moved to ``python -m clipexp.serving.predict``; this path works for one more release."""

from clipexp.serving.predict import main

if __name__ == "__main__":
    raise SystemExit(main())
