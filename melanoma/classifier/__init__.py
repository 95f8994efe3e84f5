"""What a logged model carries: the network, preprocessing, calibration, decision rule, scoring
engines and the served pyfunc. Shipped whole with every logged model; imports nothing else of the
package."""
