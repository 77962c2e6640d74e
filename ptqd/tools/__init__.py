"""Tools over bundles that use the public API like a user would: evaluate, bench, check, report, demo,
inspect. They write only under a bundle's reports/."""
