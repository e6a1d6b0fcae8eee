"""What turns an audited artifact into a released one: registry, sign-off, the trail, reports, ML-BOM."""
