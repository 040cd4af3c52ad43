module github.com/asdispatch/asdispatch/integration

go 1.26.8

require github.com/asdispatch/asdispatch v0.0.0

replace github.com/asdispatch/asdispatch => ../
